"""SynFlow (Tanaka et al., NeurIPS 2020) as a zero-cost proxy: data-free synaptic saliency.

Every parameter is replaced by its absolute value and an all-ones input is pushed through
the network in float64. With R the sum of the outputs, the score sums |theta * dR/dtheta|
over the convolution and linear weights.
"""
from __future__ import annotations

import torch
from torch import nn

from models.proxies._context import ProbeContext
from models.proxies._registry import CLOUD, ProxyInvalid, register_proxy
from models.proxies.grad_norm import reject_degenerate, weight_gradients, weight_layers

_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _linearize(network: nn.Module) -> nn.Module:
    """Make `network` (a private copy) a float64 network of non-negative parameters.

    BatchNorm runs in eval mode on reset running statistics (mean 0, variance 1), so
    each BatchNorm is the positive per-channel affine map x * |gamma| / sqrt(1 + eps) + |beta|,
    close to the identity at initialisation. Training-mode BatchNorm would subtract the
    batch mean and make activations negative, breaking the all-positive flow that SynFlow
    measures. The zero-cost-nas reference code (Abdelfattah et al., 2021) rebuilds the
    NAS-Bench-201 network without BatchNorm instead. At initialisation (gamma 1, beta 0)
    the two differ only by the factor 1 / sqrt(1 + eps) per BatchNorm.
    """
    network.double()
    network.eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, _BATCH_NORM_TYPES) and module.track_running_stats:
                module.reset_running_stats()
        for parameter in network.parameters():
            parameter.abs_()
    return network


@register_proxy(
    "synflow",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=False,
    batches=0,
    runs_on=(CLOUD,),
    options={},
    description="Natural log of the SynFlow saliency: sum of |W * dR/dW| with |W| weights and an all-ones input",
)
def synflow(context: ProbeContext) -> float:
    """Return the natural log of the SynFlow score of a private float64 copy of the network.

    The log is returned because raw scores of NAS-Bench-201 networks reach 1e50 (all-3x3
    cell, 32x32 input), far beyond float32 and awkward to aggregate. The log is monotone, so rankings do not change.
    The probe batch is used only for its per-sample shape: the input is a single all-ones
    sample, and with eval-mode BatchNorm a batch of B identical samples would only multiply
    the score by B.
    """
    reject_degenerate(context)
    network = _linearize(context.fresh_network())
    layers = weight_layers(network)
    weights = [module.weight for _, module in layers]
    for weight in weights:
        weight.requires_grad_(True)

    device = weights[0].device
    ones = torch.ones((1,) + tuple(context.inputs.shape[1:]), dtype=torch.float64, device=device)
    output = network(ones).sum()
    if not bool(torch.isfinite(output)):
        # NOTE: float64 overflows only past about 1e308, far above what NAS-Bench-201 reaches.
        raise ProxyInvalid(f"the float64 SynFlow forward pass overflowed (sum of outputs {float(output)})")
    gradients = weight_gradients(output, weights)

    saliency = torch.cat([(w.detach() * g.detach()).abs().flatten() for w, g in zip(weights, gradients)])
    if not bool(torch.isfinite(saliency).all()):
        raise ProxyInvalid("the float64 SynFlow gradients overflowed")
    # log(sum s) = log(max s) + log(sum s / max s) never forms the raw sum, so the log stays
    # finite even where the raw score would not fit in float64.
    largest = saliency.max()
    if float(largest) == 0.0:
        raise ProxyInvalid(
            "every SynFlow saliency is zero: the output does not depend on any convolution or linear weight"
        )
    log_score = torch.log(largest) + torch.log((saliency / largest).sum())
    return float(log_score)
