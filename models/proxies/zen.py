"""Zen-NAS (Lin et al., ICCV 2021): expressivity of a Gaussian-initialised network.

Every convolution and linear weight is redrawn from N(0, 1) and BatchNorm runs in
training mode. The score is

    log(Delta) + sum over BatchNorm layers of log(sqrt(mean_c var_c)),

with Delta = E_i ||f(x_i) - f(x_i + alpha * eps_i)||_F / alpha, where f is the pre-pooling
feature map (`network.forward_features`), x and eps are standard Gaussian, and var_c
is the batch variance of channel c at a BatchNorm layer's input. BatchNorm divides the
scale of its input out of the features, so the sum puts it back.

Dividing by alpha adds the constant -log(alpha) to every architecture's score, so it
does not change a ranking. Zen-NAS's own code uses the L1 norm of the difference and
reads the BatchNorm running variance after the passes. This module follows the
paper's Frobenius norm and takes the batch variance of the clean pass.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.proxies._context import ProbeContext, forward_pre_hooks, scoring_mode
from models.proxies._registry import CLOUD, DEVICE, ProxyInvalid, ProxyResult, register_proxy

# A BatchNorm input whose standard deviation is below float32 resolution relative to
# its root mean square is treated as constant. In NB201 such an input comes from a
# node with no incoming operation, so the branch is cut off from the network input.
# Its log-scale would be log(0) or rounding noise, so the layer is left out of the sum
# and counted instead.
_CONSTANT_INPUT_RTOL = float(torch.finfo(torch.float32).eps)


def gaussian_reinit_(network: nn.Module, generator: torch.Generator) -> None:
    """Redraw conv and linear weights from N(0, 1) in place, zero their biases, reset BatchNorm affine to 1 and 0."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                module.weight.normal_(0.0, 1.0, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, _BatchNorm) and module.affine:
                module.weight.fill_(1.0)
                module.bias.zero_()


def features_and_batchnorm_log_scales(
    network: nn.Module, inputs: torch.Tensor
) -> Tuple[torch.Tensor, List[float], int]:
    """Run `forward_features` once and return the features and each BatchNorm input's log-scale.

    The log-scale is log(sqrt(mean_c var_c)), with var_c the biased batch variance that
    BatchNorm normalises with, taken in float64 per channel over every dimension except
    dimension 1. Layers come in the order they ran. The third value counts the layers
    left out because their input was constant (see _CONSTANT_INPUT_RTOL).
    """
    log_scales: List[float] = []
    constant_layers = [0]

    def on_batchnorm(module: nn.Module, args: Sequence[torch.Tensor]) -> None:
        features = args[0].detach().double()
        reduce_dims = [d for d in range(features.dim()) if d != 1]
        mean_variance = float(features.var(dim=reduce_dims, unbiased=False).mean())
        mean_square = float(features.pow(2).mean())
        if mean_variance <= _CONSTANT_INPUT_RTOL ** 2 * mean_square:
            constant_layers[0] += 1
            return
        log_scales.append(0.5 * math.log(mean_variance))

    batchnorms = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    with forward_pre_hooks(batchnorms, on_batchnorm):
        features = network.forward_features(inputs)
    return features, log_scales, constant_layers[0]


def perturbation_norm(clean: torch.Tensor, moved: torch.Tensor, alpha: float) -> float:
    """Return Delta, the mean over samples of ||clean_i - moved_i||_F, divided by alpha, in float64."""
    difference = (clean.double() - moved.double()).reshape(clean.shape[0], -1)
    return float(torch.linalg.vector_norm(difference, dim=1).mean()) / alpha


def zen_score_once(
    network: nn.Module, input_shape: Sequence[int], alpha: float, generator: torch.Generator
) -> Tuple[float, float, float, int]:
    """Reinitialise `network` in place, draw x and eps, and return one Zen-NAS score.

    The draws come from `generator` in this order: the weights, x, eps. Returns (score,
    Delta, the sum of BatchNorm log-scales, the count of constant BatchNorm inputs left
    out). The caller puts the network in training mode and turns gradients off.
    """
    gaussian_reinit_(network, generator)
    inputs = torch.randn(tuple(input_shape), generator=generator)
    noise = torch.randn(tuple(input_shape), generator=generator)
    clean, log_scales, constant_layers = features_and_batchnorm_log_scales(network, inputs)
    moved = network.forward_features(inputs + alpha * noise)
    delta = perturbation_norm(clean, moved, alpha)
    if not math.isfinite(delta):
        raise ProxyInvalid(f"the feature difference is not finite ({delta}) because the Gaussian-initialised network overflows")
    if delta <= 0.0:
        raise ProxyInvalid("the features do not change when the input is perturbed, so the output does not depend on the input")
    log_scale_sum = math.fsum(log_scales)
    return math.log(delta) + log_scale_sum, delta, log_scale_sum, constant_layers


@register_proxy(
    "zen",
    higher_is_better=True,
    needs_gradients=False,
    needs_labels=False,
    batches=1,
    runs_on=(DEVICE, CLOUD),
    options={"alpha": 0.01, "repeats": 1},
    description="Zen-NAS: log of the feature change under a small input perturbation, Gaussian weights",
)
def zen(context: ProbeContext, *, alpha: float, repeats: int) -> ProxyResult:
    """Compute the Zen-NAS score on a private copy of the network, averaged over `repeats` draws.

    Only the probe batch's shape is read. Each repeat redraws the weights, x and eps
    from `context.generator`, so the global RNG is not touched.
    """
    if not alpha > 0.0:
        raise ValueError(f"zen option alpha must be positive, got {alpha}")
    if repeats < 1:
        raise ValueError(f"zen option repeats must be at least 1, got {repeats}")
    network = context.fresh_network()
    generator = context.generator(offset=1)
    scores, deltas, log_scale_sums = [], [], []
    constant_layers = 0
    with scoring_mode(network), torch.no_grad():
        for _ in range(repeats):
            score, delta, log_scale_sum, constant_layers = zen_score_once(
                network, context.inputs.shape, alpha, generator
            )
            scores.append(score)
            deltas.append(delta)
            log_scale_sums.append(log_scale_sum)
    return ProxyResult.ok(
        math.fsum(scores) / repeats,
        delta=math.fsum(deltas) / repeats,
        log_batchnorm_scale=math.fsum(log_scale_sums) / repeats,
        constant_batchnorm_inputs=constant_layers,
    )
