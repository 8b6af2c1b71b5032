"""SNIP (Lee et al., ICLR 2019) as a zero-cost proxy: summed connection sensitivity |W * dL/dW|."""
from __future__ import annotations

import torch

from models.proxies._context import ProbeContext
from models.proxies._registry import CLOUD, register_proxy
from models.proxies.grad_norm import cross_entropy_gradients, reject_degenerate, reject_zero_gradients


@register_proxy(
    "snip",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=True,
    batches=1,
    runs_on=(CLOUD,),
    options={},
    description="Sum over convolution and linear weights of |W * dL/dW|, L the cross-entropy loss",
)
def snip(context: ProbeContext) -> float:
    """Sum over every convolution and linear weight of |theta * dL/dtheta|, L the mean cross-entropy.

    This equals the gradient of the loss with respect to a multiplicative mask of ones on
    each weight, which is how SNIP defines connection sensitivity.
    """
    reject_degenerate(context)
    weights, gradients = cross_entropy_gradients(context.network, context.inputs, context.labels)
    per_layer = torch.stack(
        [(w.to(torch.float64) * g.to(torch.float64)).abs().sum() for w, g in zip(weights, gradients)]
    )
    total = per_layer.sum()
    reject_zero_gradients(total, "sum of |weight * gradient|")
    return float(total)
