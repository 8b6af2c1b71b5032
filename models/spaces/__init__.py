"""Registry of search spaces: build a space by name with `get_space`."""
from __future__ import annotations

from models.spaces._registry import SearchSpace, get_space, list_spaces, register_space

__all__ = ["SearchSpace", "get_space", "list_spaces", "register_space"]
