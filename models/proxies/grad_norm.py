"""GradNorm (Abdelfattah et al., ICLR 2021): summed L2 norms of the loss gradient per layer.

This module also contains the gradient helpers that SNIP, SynFlow and ZiCo share: the list of
convolution and linear layers a gradient proxy sums over, the cross-entropy gradients of
their weights, and the check that rejects networks whose output ignores their input.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.proxies._context import ProbeContext, scoring_mode
from models.proxies._registry import CLOUD, ProxyInvalid, register_proxy

# Layers whose weights the gradient proxies sum over. BatchNorm affine parameters and
# biases are left out, as in the published proxies.
WEIGHT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

NO_PATH_REASON = "the cell has no path from its input to its output, so the network output does not depend on its input"


def reject_degenerate(context: ProbeContext) -> None:
    """Raise ProxyInvalid when the search space marks the architecture as degenerate.

    This saves the backward pass. Networks that the space does not mark are still caught
    by each proxy's own check on its gradients.
    """
    if context.degenerate:
        raise ProxyInvalid(NO_PATH_REASON)


def weight_layers(network: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Return the named convolution and linear layers, each leaf module once."""
    layers = [(name, module) for name, module in network.named_modules() if isinstance(module, WEIGHT_LAYER_TYPES)]
    if not layers:
        raise ProxyInvalid("the network has no convolution or linear layers")
    return layers


def weight_gradients(output: torch.Tensor, weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Differentiate the scalar `output` with respect to each weight.

    A weight that `output` does not depend on gets a zero gradient. The `.grad`
    attributes are left untouched, so nothing accumulates between calls.
    """
    if not output.requires_grad:
        return [torch.zeros_like(w) for w in weights]
    gradients = torch.autograd.grad(output, list(weights), allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, gradients)]


def cross_entropy_gradients(
    network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Compute the mean cross-entropy gradient of every convolution and linear weight.

    The network runs in scoring mode (BatchNorm on batch statistics), and its flags and
    buffers are restored afterwards. Returns the weights and their gradients, detached
    and in layer order.
    """
    layers = weight_layers(network)
    with scoring_mode(network):
        weights = [module.weight for _, module in layers]
        for weight in weights:
            weight.requires_grad_(True)
        loss = F.cross_entropy(network(inputs), labels)
        gradients = weight_gradients(loss, weights)
    return [w.detach() for w in weights], [g.detach() for g in gradients]


def reject_zero_gradients(total: torch.Tensor, quantity: str) -> None:
    """Raise ProxyInvalid when `total` (a float64 reduction) is zero or not finite."""
    if not bool(torch.isfinite(total)):
        raise ProxyInvalid(f"the {quantity} is not finite ({float(total)})")
    if float(total) == 0.0:
        raise ProxyInvalid(f"the {quantity} is zero: the loss does not depend on any convolution or linear weight")


@register_proxy(
    "grad_norm",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=True,
    batches=1,
    runs_on=(CLOUD,),
    options={},
    description="Sum over convolution and linear layers of the L2 norm of the cross-entropy weight gradient",
)
def grad_norm(context: ProbeContext) -> float:
    """Sum over convolution and linear layers of ||dL/dW||_2, L the mean cross-entropy."""
    reject_degenerate(context)
    _, gradients = cross_entropy_gradients(context.network, context.inputs, context.labels)
    norms = torch.stack([torch.linalg.vector_norm(g.to(torch.float64)) for g in gradients])
    total = norms.sum()
    reject_zero_gradients(total, "sum of gradient norms")
    return float(total)
