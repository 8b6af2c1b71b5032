"""Zero-cost proxies: a registry of scores computed on an untrained network and a probe batch."""
from __future__ import annotations

from models.proxies._registry import (
    CLOUD,
    DEVICE,
    ProxyInvalid,
    ProxyResult,
    ProxySpec,
    get_proxy,
    list_proxies,
    register_proxy,
)

__all__ = [
    "CLOUD",
    "DEVICE",
    "ProxyInvalid",
    "ProxyResult",
    "ProxySpec",
    "get_proxy",
    "list_proxies",
    "register_proxy",
]
