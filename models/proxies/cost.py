"""Model size as a proxy: parameter count and FLOPs, from the architecture encoding alone."""
from __future__ import annotations

from models.proxies._context import ProbeContext
from models.proxies._registry import register_proxy


@register_proxy("params", batches=0, description="Number of parameters (BatchNorm affine included), counted from the encoding")
def params_proxy(context: ProbeContext) -> float:
    return float(context.params)


@register_proxy("flops", batches=0, description="Multiply-adds of convolutions and linear layers, counted from the encoding")
def flops_proxy(context: ProbeContext) -> float:
    return float(context.flops)
