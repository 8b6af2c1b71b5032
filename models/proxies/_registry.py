"""Proxy registry: each zero-cost proxy declares what it needs and where it may run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple, Union

from models.errors import UnknownNameError

# Places a proxy may run: on the device (forward pass only, cheap) or in the cloud.
DEVICE = "device"
CLOUD = "cloud"

# Records a proxy reads from the one forward pass shared by all forward-only proxies.
NEEDS_BLOCK_OUTPUTS = "block_outputs"
NEEDS_RELU_KERNEL = "relu_kernel"


@dataclass(frozen=True)
class ProxyResult:
    """A proxy's value for one architecture. `value` is None exactly when `valid` is False."""

    value: Optional[float]
    valid: bool
    reason: str = ""
    details: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def ok(cls, value: float, **details: Any) -> "ProxyResult":
        number = float(value)
        if not math.isfinite(number):
            return cls.invalid(f"non-finite value {number}", **details)
        return cls(number, True, "", dict(details))

    @classmethod
    def invalid(cls, reason: str, **details: Any) -> "ProxyResult":
        return cls(None, False, reason, dict(details))


class ProxyInvalid(Exception):
    """Raised inside a proxy when the architecture has no meaningful value (with the reason)."""


@dataclass(frozen=True)
class ProxySpec:
    """A registered proxy. `compute(context, **options)` returns a float or a ProxyResult."""

    name: str
    compute: Callable[..., Union[float, ProxyResult]]
    higher_is_better: bool = True
    needs_gradients: bool = False
    needs_labels: bool = False
    batches: int = 1
    runs_on: FrozenSet[str] = frozenset({DEVICE, CLOUD})
    forward_needs: FrozenSet[str] = frozenset()
    options: Tuple[Tuple[str, Any], ...] = ()
    description: str = ""
    # Incremented whenever the code changes the proxy's value for the same options, so that
    # score caches stop returning values computed by the older code.
    revision: int = 1

    @property
    def forward_only(self) -> bool:
        """Whether the proxy reads only the shared forward pass (no backward, no extra pass)."""
        return bool(self.forward_needs) and not self.needs_gradients

    def default_options(self) -> Dict[str, Any]:
        return dict(self.options)

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "higher_is_better": self.higher_is_better,
            "needs_gradients": self.needs_gradients,
            "needs_labels": self.needs_labels,
            "batches": self.batches,
            "runs_on": sorted(self.runs_on),
            "options": self.default_options(),
            "description": self.description,
        }


_PROXIES: Dict[str, ProxySpec] = {}


def register_proxy(
    name: str,
    *,
    higher_is_better: bool = True,
    needs_gradients: bool = False,
    needs_labels: bool = False,
    batches: int = 1,
    runs_on: Tuple[str, ...] = (DEVICE, CLOUD),
    forward_needs: Tuple[str, ...] = (),
    options: Optional[Dict[str, Any]] = None,
    description: str = "",
    revision: int = 1,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `compute(context, **options)` under `name`."""

    def decorator(compute: Callable[..., Any]) -> Callable[..., Any]:
        if name in _PROXIES:
            raise ValueError(f"proxy {name!r} is registered twice")
        _PROXIES[name] = ProxySpec(
            name=name,
            compute=compute,
            higher_is_better=higher_is_better,
            needs_gradients=needs_gradients,
            needs_labels=needs_labels,
            batches=batches,
            runs_on=frozenset(runs_on),
            forward_needs=frozenset(forward_needs),
            options=tuple(sorted((options or {}).items())),
            description=description or _first_line(compute.__doc__),
            revision=revision,
        )
        return compute

    return decorator


def _first_line(text: Optional[str]) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _load_builtin_proxies() -> None:
    import models.proxies.builtin  # noqa: F401  (each module registers its proxies)


def list_proxies() -> List[str]:
    _load_builtin_proxies()
    return sorted(_PROXIES)


def get_proxy(name: str) -> ProxySpec:
    _load_builtin_proxies()
    if name not in _PROXIES:
        raise UnknownNameError(f"unknown proxy {name!r}; known proxies: {', '.join(sorted(_PROXIES))}")
    return _PROXIES[name]
