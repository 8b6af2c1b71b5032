"""Search spaces, zero-cost proxies and their aggregation.

Importing this package does not import torch, so that the MQTT protocol code can
share its error types on a machine without torch.
"""
from __future__ import annotations

from models.errors import EdgeNasError

__all__ = ["EdgeNasError"]
