"""The device side of edge-nas: data, scoring runs, measurement, search, export and the CLI."""
from __future__ import annotations

__version__ = "0.1.0"
