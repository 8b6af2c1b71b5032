"""TE-NAS (Chen et al., ICLR 2021): NTK conditioning and linear-region count at initialisation.

TE-NAS measures trainability by the condition number of the neural tangent kernel
(lower is better) and expressivity by the number of linear regions the ReLU network
cuts the input batch into (higher is better). Both are read from the untrained
network with BatchNorm in training mode, on standard Gaussian inputs of the probe
batch's shape drawn from `context.generator`.

NTK. Row i of the Jacobian G is the gradient of sample i's summed logits with respect
to every parameter, as in the TE-NAS code, which backpropagates a vector of ones
from each sample's logits. The forward pass runs on the whole batch, so BatchNorm
statistics couple the samples as they do in training. The NTK is G G^T (B x B),
accumulated in float64 one parameter tensor at a time.

Linear regions. A sample's activation pattern is the sign of every unit at the
input of every leaf ReLU module. Samples with the same pattern lie in the same
linear region, so the count of distinct patterns over the batch is a lower bound
on the number of regions. It is at most the batch size. On the full network and
inputs of the probe's shape the count saturates: at 32x32 and 16x16 each Gaussian
sample of an NB201 network with a path lands in its own region. `tenas_regions`
therefore counts, like TE-NAS's search code, on a thin copy of the network (one
channel, one cell per stage, where the space offers `build_thin`) over 1,000
Gaussian inputs of 3 x 3 pixels. The per-architecture `tenas` keeps the
probe-shaped count, so values computed before this change stay comparable.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from models.proxies._context import ProbeContext, build_seeded, forward_pre_hooks, relu_modules, scoring_mode
from models.proxies._registry import CLOUD, DEVICE, ProxyInvalid, ProxyResult, register_proxy

# The Jacobian is computed in float32, so singular values of G below about 1e-6 of the
# largest are at the level of rounding error (an estimate, not a bound). An NTK whose
# eigenvalue ratio is below their square, 1e-12, is treated as singular. That happens
# when samples have linearly dependent gradients, e.g. when the output does not depend
# on the input (NB201 cells without a path give exactly rank 1).
_NTK_SINGULAR_RTOL = 1e-12

# Separate streams of context.generator, so that changing one batch size leaves the
# other proxy's inputs unchanged.
_NTK_STREAM = 11
_REGIONS_STREAM = 12


def per_sample_gradient_gram(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Return the B x B float64 NTK G G^T of the summed logits of each sample.

    The network runs as it is: the caller sets the training mode. One forward pass on
    the whole batch is followed by one backward pass per sample.
    """
    parameters = [p for p in network.parameters() if p.requires_grad]
    if not parameters:
        raise ProxyInvalid("the network has no trainable parameters, so its NTK is empty")
    batch = inputs.shape[0]
    logits = network(inputs)
    sample_outputs = logits.reshape(batch, -1).sum(dim=1)

    # NOTE: on torch 2.13 CPU (2 shared cores) one backward pass per sample was faster than
    # the vectorised torch.autograd.grad(..., is_grads_batched=True): 1.3 s against 2.1 s
    # for a 1.1M-parameter NB201 network, batch 16, 32x32. Not measured on a GPU.
    # torch.func.vmap over a per-sample grad is not used because it would give each
    # sample its own BatchNorm statistics.
    rows: List[List[torch.Tensor]] = []
    for index in range(batch):
        gradients = torch.autograd.grad(
            sample_outputs[index], parameters, retain_graph=index + 1 < batch, allow_unused=True
        )
        rows.append([g if g is not None else torch.zeros_like(p) for g, p in zip(gradients, parameters)])

    gram = torch.zeros(batch, batch, dtype=torch.float64)
    for position in range(len(parameters)):
        block = torch.stack([row[position].reshape(-1) for row in rows]).double()
        gram += block @ block.t()
    return gram


def ntk_condition_number(network: nn.Module, inputs: torch.Tensor) -> Tuple[float, float, float]:
    """Return (lambda_max / lambda_min, lambda_max, lambda_min) of the NTK on `inputs`.

    Raises ProxyInvalid when the NTK is zero or singular to working precision. The
    network runs in scoring mode and its state is restored afterwards.
    """
    with scoring_mode(network):
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        gram = per_sample_gradient_gram(network, inputs)
    eigenvalues = torch.linalg.eigvalsh(gram)
    largest = float(eigenvalues[-1])
    smallest = float(eigenvalues[0])
    if not (math.isfinite(largest) and math.isfinite(smallest)):
        raise ProxyInvalid(f"the NTK has non-finite eigenvalues ({smallest}, {largest})")
    if largest <= 0.0:
        raise ProxyInvalid("every per-sample gradient is zero, so the NTK is zero")
    if smallest <= largest * _NTK_SINGULAR_RTOL:
        raise ProxyInvalid(
            f"the NTK is singular (eigenvalues {smallest:.3g} to {largest:.3g}), so some samples "
            "have linearly dependent gradients, e.g. because the output does not depend on the input"
        )
    return largest / smallest, largest, smallest


def count_activation_patterns(network: nn.Module, inputs: torch.Tensor) -> Tuple[int, int]:
    """Return (distinct ReLU activation patterns over the batch, ReLU units per sample).

    A unit is active when its value at a leaf ReLU module's input is positive. Samples
    are split into groups with equal patterns one ReLU at a time, so no full pattern
    is stored. A network without ReLU modules has one pattern, the empty one.
    """
    batch = inputs.shape[0]
    group_of_sample = np.zeros(batch, dtype=np.int64)
    group_count = [1]
    units = [0]

    def on_relu(module: nn.Module, args: Sequence[torch.Tensor]) -> None:
        codes = (args[0].detach().reshape(batch, -1) > 0).numpy()
        units[0] += codes.shape[1]
        if group_count[0] == batch:
            return  # every sample is already alone in its group
        packed = np.packbits(codes, axis=1)
        labels: Dict[Tuple[int, bytes], int] = {}
        for sample in range(batch):
            key = (int(group_of_sample[sample]), packed[sample].tobytes())
            group_of_sample[sample] = labels.setdefault(key, len(labels))
        group_count[0] = len(labels)

    with scoring_mode(network), torch.no_grad(), forward_pre_hooks(relu_modules(network), on_relu):
        network(inputs)
    return group_count[0], units[0]


def tenas_rank_combine(ntk_values: Sequence[float], region_values: Sequence[float]) -> np.ndarray:
    """Combine a population's `tenas_ntk` and `tenas_regions` values by rank sum, as TE-NAS does.

    Both inputs are per-architecture proxy values where higher is better (-log of the
    condition number, log of the region count). Each is ranked from 1 (worst) to N
    (best), ties taking their average rank, and the two ranks are added, so a higher
    sum is better. TE-NAS orders by the sum of the NTK rank (ascending condition number)
    and the region rank (descending count), which gives the same order. Invalid
    architectures must be removed first. Raises ValueError on non-finite values or
    unequal lengths.
    """
    from scipy.stats import rankdata

    ntk = np.asarray(ntk_values, dtype=np.float64)
    regions = np.asarray(region_values, dtype=np.float64)
    if ntk.ndim != 1 or ntk.shape != regions.shape:
        raise ValueError(
            f"expected two 1-D sequences of equal length, got shapes {ntk.shape} and {regions.shape}"
        )
    if not (np.all(np.isfinite(ntk)) and np.all(np.isfinite(regions))):
        raise ValueError("tenas_rank_combine received non-finite values; drop the invalid architectures first")
    return rankdata(ntk, method="average") + rankdata(regions, method="average")


def _gaussian_inputs(context: ProbeContext, batch_size: int, stream: int) -> torch.Tensor:
    if batch_size < 2:
        raise ValueError(f"TE-NAS batch sizes must be at least 2, got {batch_size}")
    shape = (batch_size,) + tuple(context.inputs.shape[1:])
    return torch.randn(shape, generator=context.generator(offset=stream))


def _log_condition_number(context: ProbeContext, batch_size: int) -> Tuple[float, Dict[str, float]]:
    inputs = _gaussian_inputs(context, batch_size, _NTK_STREAM)
    condition, largest, smallest = ntk_condition_number(context.network, inputs)
    details = {"condition_number": condition, "ntk_max_eigenvalue": largest, "ntk_min_eigenvalue": smallest}
    return math.log(condition), details


_REGION_NETWORKS = ("thin", "probe")
_THIN_INPUT_PIXELS = 3


def _log_region_count(context: ProbeContext, batch_size: int, network: str = "probe") -> Tuple[float, Dict[str, Any]]:
    """Count activation patterns on the thin copy ('thin', 3 x 3 inputs) or the scored network ('probe')."""
    if network not in _REGION_NETWORKS:
        raise ValueError(f"unknown region network {network!r}; expected one of {', '.join(_REGION_NETWORKS)}")
    build_thin = getattr(context.space, "build_thin", None)
    if network == "thin" and build_thin is not None:
        model = build_seeded(lambda: build_thin(context.arch), context.seed)
        if batch_size < 2:
            raise ValueError(f"TE-NAS batch sizes must be at least 2, got {batch_size}")
        shape = (batch_size, context.inputs.shape[1], _THIN_INPUT_PIXELS, _THIN_INPUT_PIXELS)
        inputs = torch.randn(shape, generator=context.generator(offset=_REGIONS_STREAM))
    else:
        # A space without a thin copy counts on the scored network with probe-shaped inputs.
        network = "probe"
        model = context.network
        inputs = _gaussian_inputs(context, batch_size, _REGIONS_STREAM)
    patterns, units = count_activation_patterns(model, inputs)
    details = {"linear_regions": patterns, "relu_units": units, "regions_batch_size": batch_size, "regions_network": network}
    return math.log(patterns), details


@register_proxy(
    "tenas_ntk",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=False,
    batches=1,
    runs_on=(CLOUD,),
    options={"batch_size": 16},
    description="TE-NAS trainability: minus the log condition number of the NTK",
)
def tenas_ntk(context: ProbeContext, *, batch_size: int) -> ProxyResult:
    """Return -log(lambda_max / lambda_min) of the NTK on `batch_size` Gaussian inputs."""
    log_condition, details = _log_condition_number(context, batch_size)
    return ProxyResult.ok(-log_condition, **details)


@register_proxy(
    "tenas_regions",
    higher_is_better=True,
    needs_gradients=False,
    needs_labels=False,
    batches=1,
    runs_on=(DEVICE, CLOUD),
    options={"batch_size": 1000, "network": "thin"},
    description="TE-NAS expressivity: log of the distinct ReLU activation patterns over Gaussian inputs",
)
def tenas_regions(context: ProbeContext, *, batch_size: int, network: str) -> ProxyResult:
    """Return the log of the number of linear regions met by `batch_size` Gaussian inputs.

    `network` is 'thin' (a one-channel copy on 3 x 3 inputs, where the space offers one)
    or 'probe' (the scored network on inputs of the probe's shape).
    """
    log_regions, details = _log_region_count(context, batch_size, network)
    return ProxyResult.ok(log_regions, **details)


@register_proxy(
    "tenas",
    higher_is_better=True,
    needs_gradients=True,
    needs_labels=False,
    batches=1,
    runs_on=(CLOUD,),
    options={"ntk_batch_size": 16, "regions_batch_size": 64},
    description="TE-NAS per architecture: log(linear regions) - log(NTK condition number)",
)
def tenas(context: ProbeContext, *, ntk_batch_size: int, regions_batch_size: int) -> ProxyResult:
    """Return log(regions) - log(condition number), a per-architecture stand-in for TE-NAS.

    TE-NAS itself ranks a population twice (by condition number and by region count)
    and orders architectures by the sum of the two ranks. A rank needs the whole
    population, so it cannot be one architecture's value. The sum of the two logs
    rewards the same directions and is the per-architecture stand-in, but it weighs
    the two terms by their spread in log space instead of by rank.
    `tenas_rank_combine` computes the population version from `tenas_ntk` and
    `tenas_regions` values.
    """
    log_condition, ntk_details = _log_condition_number(context, ntk_batch_size)
    log_regions, region_details = _log_region_count(context, regions_batch_size)
    return ProxyResult.ok(log_regions - log_condition, **ntk_details, **region_details)
