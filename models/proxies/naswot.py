"""NASWOT (Mellor et al., ICML 2021): log-determinant of the ReLU activation-pattern kernel.

K[i, j] counts the ReLU units on which samples i and j fall on the same side of zero,
summed over every ReLU of the network (the pattern is taken at each ReLU's input). A
network that separates the probe samples well has a well-conditioned K.
"""
from __future__ import annotations

import torch

from models.proxies._context import ProbeContext
from models.proxies._registry import DEVICE, CLOUD, NEEDS_RELU_KERNEL, ProxyInvalid, register_proxy


@register_proxy(
    "naswot",
    forward_needs=(NEEDS_RELU_KERNEL,),
    runs_on=(DEVICE, CLOUD),
    description="log|K_H|, the Hamming-similarity kernel of ReLU activation patterns",
)
def naswot(context: ProbeContext) -> float:
    kernel = context.forward_record().relu_kernel
    if kernel is None or float(kernel.abs().sum()) == 0.0:
        raise ProxyInvalid("the network has no ReLU units, so the activation-pattern kernel is empty")
    sign, logdet = torch.linalg.slogdet(kernel)
    if float(sign) <= 0:
        raise ProxyInvalid("the activation-pattern kernel is singular: two probe samples share every pattern")
    return float(logdet)
