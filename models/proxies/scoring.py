"""Score one architecture with several proxies, sharing one forward pass between them."""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from models.proxies._context import ProbeContext
from models.proxies._registry import ProxyInvalid, ProxyResult, ProxySpec, get_proxy

logger = logging.getLogger(__name__)

# Numerical failures that make one architecture's value meaningless without being a bug.
_NUMERICAL_ERRORS = (FloatingPointError, torch.linalg.LinAlgError, ZeroDivisionError, OverflowError)


def resolve_proxies(names: Sequence[str]) -> Dict[str, ProxySpec]:
    return {name: get_proxy(name) for name in names}


def score_architecture(
    space: Any,
    arch: Any,
    inputs: torch.Tensor,
    labels: Optional[torch.Tensor],
    proxies: Sequence[str],
    *,
    seed: int = 0,
    options: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Dict[str, ProxyResult]:
    """Compute each named proxy for one architecture; the network is released afterwards.

    Each result's details hold `seconds`, the proxy's own time plus the shared forward
    pass it read (what it would cost alone). `options[name]` overrides a proxy's defaults.
    """
    specs = resolve_proxies(proxies)
    forward_needs = set()
    for spec in specs.values():
        forward_needs |= spec.forward_needs
    context = ProbeContext(space, arch, inputs, labels, seed=seed, forward_needs=forward_needs)
    results: Dict[str, ProxyResult] = {}
    try:
        for name, spec in specs.items():
            results[name] = run_proxy(spec, context, (options or {}).get(name))
    finally:
        context.release()
    return results


def run_proxy(spec: ProxySpec, context: ProbeContext, options: Optional[Mapping[str, Any]] = None) -> ProxyResult:
    settings = spec.default_options()
    unknown = set(options or {}) - set(settings)
    if unknown:
        raise ValueError(f"proxy {spec.name!r} has no option {sorted(unknown)}; options: {sorted(settings)}")
    settings.update(options or {})
    if spec.needs_labels and context.labels is None:
        return ProxyResult.invalid("this proxy needs labels and the probe batch has none")

    had_record = context._record is not None
    start = time.perf_counter()
    try:
        outcome = spec.compute(context, **settings)
    except ProxyInvalid as error:
        outcome = ProxyResult.invalid(str(error))
    except _NUMERICAL_ERRORS as error:
        outcome = ProxyResult.invalid(f"{type(error).__name__}: {error}")
    finally:
        if context._network is not None:
            context._network.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    if had_record and spec.forward_needs and context._record is not None:
        seconds += context._record.seconds  # its share is the whole pass it read

    result = outcome if isinstance(outcome, ProxyResult) else ProxyResult.ok(outcome)
    details = dict(result.details)
    details["seconds"] = seconds
    return ProxyResult(result.value, result.valid, result.reason, details)
