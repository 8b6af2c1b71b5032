"""Import every built-in proxy module so that each registers itself."""
from __future__ import annotations

import importlib

_MODULES = (
    "models.proxies.cost",
    "models.proxies.naswot",
    "models.proxies.grad_norm",
    "models.proxies.snip",
    "models.proxies.synflow",
    "models.proxies.jacob_cov",
    "models.proxies.zico",
    "models.proxies.zen",
    "models.proxies.tenas",
    "models.proxies.fgnas",
)

for _name in _MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as _error:
        # Only a module of this list that does not exist yet is skipped; a missing dependency is re-raised.
        if _error.name != _name:
            raise
