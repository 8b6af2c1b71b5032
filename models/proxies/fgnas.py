"""FG-NAS component proxies: feature richness and diversity (device), gradient stability and convergence (cloud).

FG-NAS (Huang et al., IEEE MASS 2025) scores an untrained network with two feature proxies,
computed from the block outputs of the one shared forward pass, and two gradient proxies built
on each block's gain, the singular values of the block Jacobian d x_l / d x_{l-1}. The readings
of the formulas are the ones measured to rank NAS-Bench-201 well:

- `fgnas_fi`, feature richness: the Gaussian entropy of each block's trace-normalised
  principal-component spectrum (`reading="spectrum"`), or the literal Gaussian entropy of the
  output variance (`reading="variance"`, which ranks NAS-Bench-201 backwards).
- `fgnas_fc`, feature diversity: sum over blocks of (||F||_nuc / ||F||_F) / sum|P|, where P is
  the B x B Pearson correlation between the samples' features. The Frobenius division makes it
  scale-free.
- `fgnas_gc`, gradient stability: sum over blocks of 2^-(sigma + 1/sigma), largest at gain 1.
- `fgnas_gi`, convergence and generalisation: a ZiCo-like sum over the blocks whose gain lies
  in [k, m] of log(sum over weights of mean|g| / std(g)) across micro-batches.

The gain of block l is measured by recomputing only that block on the input the shared forward
pass recorded for it, so no full extra forward pass is run.

The defaults come from a 250-architecture NAS-Bench-201 sample (tools/fgnas_dev.py writes the
evidence to docs/fgnas-dev.md): the feature proxies keep the quarter of the blocks with the widest
outputs (r = 0.25, importance 'width'), S_GI keeps gains in [1/3, 3] and reads 2 micro-batches of
16 samples, and the gains use 8 samples and one probe.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.proxies._context import ProbeContext, block_modules, scoring_mode
from models.proxies._registry import CLOUD, DEVICE, NEEDS_BLOCK_OUTPUTS, ProxyInvalid, ProxyResult, register_proxy

logger = logging.getLogger(__name__)

GAIN_ESTIMATORS = ("rms", "top")
RICHNESS_READINGS = ("spectrum", "variance")
IMPORTANCE_MEASURES = ("term", "width", "energy", "gain")

# A variance or eigenvalue at or below this fraction of its reference (the sample's mean square,
# the spectrum's total) counts as zero. Exactly constant features reach these checks as exact
# zeros or as float64 rounding near 1e-16, while real variation in float32 features is far above it.
RELATIVE_ZERO = 1e-10

# Offsets of the random streams drawn from the context's seed, so that gain probes and PCA
# sketches never share random numbers.
_GAIN_STREAM = 101
_PCA_STREAM = 202

# Power iterations of randomized PCA: two are enough for the fast-decaying spectra of block outputs.
_PCA_POWER_ITERATIONS = 2

# Conv and linear layers whose weight gradients S_GI reads (BatchNorm affine parameters are left out, as in ZiCo).
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_NO_PATH_REASON = "the cell has no path from its input to its output, so the network output does not depend on its input"


# --------------------------------------------------------------------------------------
# Option checks and the layer subset


def _check_ratio(r: float) -> None:
    if not 0.0 < float(r) <= 1.0:
        raise ValueError(f"the layer ratio r must lie in (0, 1], got {r}")


def _check_importance(importance: str, *, gradients_allowed: bool) -> None:
    if importance not in IMPORTANCE_MEASURES:
        raise ValueError(f"unknown importance measure {importance!r}; expected one of {', '.join(IMPORTANCE_MEASURES)}")
    if importance == "gain" and not gradients_allowed:
        raise ValueError(
            "importance 'gain' needs the block gains, which need gradients, but a feature proxy "
            "runs forward-only, so use 'term', 'width' or 'energy'"
        )


def select_layers(importance: Sequence[float], r: float) -> List[int]:
    """Return the indices of the ceil(r * L) most important layers, in layer order.

    Ties keep the earlier layer. With r = 1 every layer is returned.
    """
    _check_ratio(r)
    count = len(importance)
    keep = max(1, int(math.ceil(float(r) * count - 1e-9)))
    if keep >= count:
        return list(range(count))
    order = sorted(range(count), key=lambda index: (-float(importance[index]), index))
    return sorted(order[:keep])


def _importance_measure(context: ProbeContext, importance: str, gains: Optional[Sequence[float]] = None) -> Callable[[int], float]:
    """Return block -> importance for the measures other than 'term' (the proxy's own per-block term).

    'width' is the features per sample of the block output: on NAS-Bench-201 the S_FC terms of the
    high-resolution blocks near the input rank architectures best, and ties keep the earlier block.
    'energy' is the mean squared activation. 'gain' is -|ln sigma|, highest for a gain of 1.
    """
    if importance == "width":
        outputs = _block_outputs(context)
        return lambda block: float(outputs[block][0].numel())
    if importance == "energy":
        return lambda block: _tap_statistics(context, block).energy
    if importance == "gain":
        assert gains is not None
        return lambda block: -abs(math.log(gains[block])) if gains[block] > 0.0 else -math.inf
    raise ValueError(f"importance {importance!r} is the proxy's own term, not a separate measure")


def _select_and_score(
    importance: str,
    r: float,
    layers: Sequence[int],
    term_of: Callable[[int], float],
    measure_of: Optional[Callable[[int], float]],
) -> Tuple[Dict[int, float], List[int]]:
    """Choose ceil(r * L) of `layers` and return ({layer: term}, chosen layers).

    With importance 'term' every term is computed and the largest are kept. With another
    measure the layers are chosen first, so only the chosen layers' terms are computed.
    """
    if importance == "term":
        terms = {layer: term_of(layer) for layer in layers}
        chosen = [layers[i] for i in select_layers([terms[layer] for layer in layers], r)]
        return terms, chosen
    assert measure_of is not None
    chosen = [layers[i] for i in select_layers([measure_of(layer) for layer in layers], r)]
    return {layer: term_of(layer) for layer in chosen}, chosen


def _layered_result(
    terms: Dict[int, float], chosen: Sequence[int], count: int, **details: Any
) -> ProxyResult:
    """Return the sum of the chosen layers' terms, with every computed term (None where not computed) in the details."""
    value = sum(terms[layer] for layer in chosen)
    listed = [terms.get(layer) for layer in range(count)]
    return ProxyResult.ok(value, layer_terms=listed, layers_used=list(chosen), **details)


# --------------------------------------------------------------------------------------
# Feature statistics shared by S_FI and S_FC


@dataclass
class TapStatistics:
    """Second moments of one block's output F (B x D, one row per probe sample), stored in float64."""

    centred_gram: torch.Tensor  # F_c F_c^T, each sample's features centred on their own mean, B x B
    row_means: torch.Tensor  # m, the mean of each sample's features, length B
    width: int  # D, the features per sample

    @property
    def batch(self) -> int:
        return int(self.centred_gram.shape[0])

    @property
    def gram(self) -> torch.Tensor:
        """F F^T = F_c F_c^T + D m m^T."""
        return self.centred_gram + self.width * torch.outer(self.row_means, self.row_means)

    @property
    def energy(self) -> float:
        """Mean squared activation."""
        return float(torch.trace(self.gram)) / (self.batch * self.width)


def tap_statistics(features: torch.Tensor) -> TapStatistics:
    """Compute the row-centred Gram matrix and row means of a B x ... block output.

    The means are float64 reductions, so a constant sample centres to exact zeros. The Gram
    product runs in the features' dtype: in float32 each entry is a sum of D products, with an
    estimated relative rounding error of 1e-6 or less, far below what S_FC resolves. The float64
    product cost about a sixth of a forward pass (NAS-Bench-201, batch 64, one CPU thread).
    Everything after the product is float64.
    """
    flat = features.detach().reshape(features.shape[0], -1)
    means = flat.mean(dim=1, dtype=torch.float64)
    centred = flat - means.to(flat.dtype).unsqueeze(1)
    return TapStatistics(
        centred_gram=(centred @ centred.t()).to(torch.float64), row_means=means, width=int(flat.shape[1])
    )


def _block_outputs(context: ProbeContext) -> List[torch.Tensor]:
    """Return the recorded block outputs, after checking that the network output depends on the input.

    The check compares the logits of every probe sample exactly, so it catches networks whose
    output is a constant (a cell without a path gives exact zeros). A block subset (r < 1)
    would otherwise score such a network on blocks that still vary.
    """
    record = context.forward_record((NEEDS_BLOCK_OUTPUTS,))
    if not record.block_outputs:
        raise ProxyInvalid("the network exposes no feature taps, so there are no block outputs to score")
    logits = record.logits
    if logits.shape[0] > 1 and bool((logits == logits[:1]).all()):
        raise ProxyInvalid("the network output is the same for every probe sample, so it does not depend on the input")
    return record.block_outputs


def _tap_statistics(context: ProbeContext, block: int) -> TapStatistics:
    """Compute the Gram statistics of one block output once per context, so S_FI and S_FC share them."""
    cache = context.cache.setdefault("fgnas.tap_statistics", {})
    if block not in cache:
        cache[block] = tap_statistics(_block_outputs(context)[block])
    return cache[block]


def _checked_eigenvalues(symmetric: torch.Tensor) -> torch.Tensor:
    """Return the eigenvalues of a positive semi-definite matrix, descending, with rounding negatives set to zero."""
    values = torch.linalg.eigvalsh(symmetric).flip(0)
    return values.clamp_min(0.0)


def _pearson_abs_sum(statistics: TapStatistics, tap: int) -> float:
    """Return the sum of |P| over the B x B Pearson correlation matrix between the samples' feature vectors."""
    centred = statistics.centred_gram
    variances = torch.diagonal(centred)
    flat = variances <= RELATIVE_ZERO * torch.diagonal(statistics.gram)
    if bool(flat.any()):
        sample = int(torch.nonzero(flat)[0])
        raise ProxyInvalid(
            f"block {tap}: probe sample {sample} has the same value in every feature (zero variance), "
            "so its Pearson correlation is undefined"
        )
    inverse_std = variances.rsqrt()
    pearson = centred * torch.outer(inverse_std, inverse_std)
    return float(pearson.abs().sum())


def randomized_svd(
    matrix: torch.Tensor, rank: int, generator: torch.Generator, power_iterations: int = _PCA_POWER_ITERATIONS
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the top `rank` left singular vectors and singular values of a float64 B x D matrix.

    A randomized range finder (Halko, Martinsson and Tropp, 2011) with a Gaussian sketch drawn
    from `generator`, so the result depends only on the caller's seed. When `rank` reaches
    min(B, D) the sketch spans the whole column space and the values are exact.
    """
    rows, columns = matrix.shape
    rank = min(rank, rows, columns)
    sketch_width = min(rank + 8, rows, columns)
    sketch = torch.randn(columns, sketch_width, generator=generator, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ sketch)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(matrix @ (matrix.t() @ basis))
    small = basis.t() @ matrix
    left, values, _ = torch.linalg.svd(small, full_matrices=False)
    return (basis @ left)[:, :rank], values[:rank]


def _reduced_statistics(features: torch.Tensor, dimensions: int, generator: torch.Generator) -> TapStatistics:
    """Compute the Gram statistics of the samples projected on their top `dimensions` principal directions (uncentred)."""
    flat = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    left, values = randomized_svd(flat, dimensions, generator)
    return tap_statistics(left * values)


def diversity_term(statistics: TapStatistics, tap: int = 0) -> Dict[str, float]:
    """Compute one block's S_FC term, (||F||_nuc / ||F||_F) / sum|P|, with its parts.

    The nuclear norm comes from the eigenvalues of the B x B Gram matrix F F^T (the squared
    singular values of F), which is exact and cheaper than an SVD of F when B <= D.
    """
    gram = statistics.gram
    squared_norm = float(torch.trace(gram))
    if not squared_norm > 0.0:
        raise ProxyInvalid(f"block {tap} outputs zeros for every probe sample")
    nuclear = float(_checked_eigenvalues(gram).sqrt().sum())
    pearson = _pearson_abs_sum(statistics, tap)
    frobenius = math.sqrt(squared_norm)
    return {"term": (nuclear / frobenius) / pearson, "nuclear": nuclear, "frobenius": frobenius, "pearson_abs_sum": pearson}


def principal_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Return the eigenvalues of the B x B Gram matrix of the features centred over the samples, descending.

    These are B times the PCA variances of F. Computed in float64 throughout, because the
    entropy reading takes logs of the smallest ones.
    """
    flat = features.detach().reshape(features.shape[0], -1).to(torch.float64)
    centred = flat - flat.mean(dim=0, keepdim=True)
    return _checked_eigenvalues(centred @ centred.t())


def richness_term_from_spectrum(spectrum: torch.Tensor, components: int, tap: int = 0) -> float:
    """Return the Gaussian entropy of the top `components` of a trace-normalised PCA spectrum.

    Each component contributes ln(2 pi e lambda_i / sum_j lambda_j) / 2, so the term is
    scale-free. Raises ProxyInvalid when a used component is zero (rank-deficient features).
    """
    total = float(spectrum.sum())
    if not total > 0.0:
        raise ProxyInvalid(f"block {tap} features have zero variance across the probe samples")
    top = spectrum[:components] / total
    nonzero = int((top > RELATIVE_ZERO).sum())
    if nonzero < top.numel():
        raise ProxyInvalid(
            f"block {tap} features are rank-deficient: {nonzero} of their top {top.numel()} principal "
            "components are nonzero, so the spectrum entropy is -inf"
        )
    return float((0.5 * torch.log(2.0 * math.pi * math.e * top)).sum())


def variance_richness_term(statistics: TapStatistics, tap: int = 0) -> float:
    """Compute the slides' literal S_FI term, (ln(2 pi var) + 1) / 2, with var the variance of all entries of F."""
    mean = float(statistics.row_means.mean())
    variance = statistics.energy - mean * mean
    if not variance > RELATIVE_ZERO * statistics.energy:
        raise ProxyInvalid(f"block {tap} output has zero variance")
    return 0.5 * (math.log(2.0 * math.pi * variance) + 1.0)


# --------------------------------------------------------------------------------------
# Feature proxies (device)


def _check_feature_options(r: float, importance: str, pca_dim: Optional[int]) -> None:
    _check_ratio(r)
    _check_importance(importance, gradients_allowed=False)
    if pca_dim is not None and int(pca_dim) < 1:
        raise ValueError(f"pca_dim must be a positive number of components or None, got {pca_dim}")


def _feature_measure(context: ProbeContext, importance: str) -> Optional[Callable[[int], float]]:
    return None if importance == "term" else _importance_measure(context, importance)


@register_proxy(
    "fgnas_fc",
    forward_needs=(NEEDS_BLOCK_OUTPUTS,),
    runs_on=(DEVICE, CLOUD),
    options={"pca_dim": None, "r": 0.25, "importance": "width"},
    description="FG-NAS feature diversity: sum over blocks of (||F||_nuc / ||F||_F) / sum|Pearson(samples)|",
)
def feature_diversity(
    context: ProbeContext, pca_dim: Optional[int] = None, r: float = 0.25, importance: str = "width"
) -> ProxyResult:
    """Sum over blocks of (||F_l||_nuc / ||F_l||_F) / sum|P_l|, the scale-free S_FC.

    With `pca_dim` = d, each block's features are first projected on their top d principal
    directions by randomized PCA (the route for large batches). By default the exact B x B
    Gram route is used. `r` < 1 keeps the ceil(r L) blocks ranked first by `importance`.
    """
    _check_feature_options(r, importance, pca_dim)
    outputs = _block_outputs(context)
    generator = context.generator(_PCA_STREAM)

    def term_of(block: int) -> float:
        if pca_dim is None:
            statistics = _tap_statistics(context, block)
        else:
            statistics = _reduced_statistics(outputs[block], int(pca_dim), generator)
        return diversity_term(statistics, block)["term"]

    terms, chosen = _select_and_score(importance, r, list(range(len(outputs))), term_of, _feature_measure(context, importance))
    return _layered_result(terms, chosen, len(outputs))


@register_proxy(
    "fgnas_fi",
    forward_needs=(NEEDS_BLOCK_OUTPUTS,),
    runs_on=(DEVICE, CLOUD),
    options={"reading": "spectrum", "pca_dim": None, "r": 0.25, "importance": "width"},
    description="FG-NAS feature richness: Gaussian entropy of each block's trace-normalised PCA spectrum",
)
def feature_richness(
    context: ProbeContext,
    reading: str = "spectrum",
    pca_dim: Optional[int] = None,
    r: float = 0.25,
    importance: str = "width",
) -> ProxyResult:
    """Sum over blocks of the Gaussian entropy of the features (S_FI).

    `reading="spectrum"` sums ln(2 pi e lambda_i / sum_j lambda_j) / 2 over the top principal
    components (all min(B - 1, D) of them, or `pca_dim` by randomized PCA). `reading="variance"`
    is the slides' literal formula on the raw output variance.
    """
    if reading not in RICHNESS_READINGS:
        raise ValueError(f"unknown S_FI reading {reading!r}; expected one of {', '.join(RICHNESS_READINGS)}")
    _check_feature_options(r, importance, pca_dim)
    outputs = _block_outputs(context)
    generator = context.generator(_PCA_STREAM)

    def term_of(block: int) -> float:
        if reading == "variance":
            return variance_richness_term(_tap_statistics(context, block), block)
        if pca_dim is None:
            spectrum = principal_spectrum(outputs[block])
            components = min(outputs[block].shape[0] - 1, outputs[block][0].numel())
            return richness_term_from_spectrum(spectrum, components, block)
        flat = outputs[block].detach().reshape(outputs[block].shape[0], -1).to(torch.float64)
        centred = flat - flat.mean(dim=0, keepdim=True)
        components = min(int(pca_dim), centred.shape[0] - 1, centred.shape[1])
        _, values = randomized_svd(centred, components, generator)
        # The normaliser is the whole variance, ||F_c||_F^2, not only the part in the top components.
        rest = (centred.pow(2).sum() - values.pow(2).sum()).clamp_min(0.0)
        return _richness_from_partial_spectrum(torch.cat([values.pow(2), rest.view(1)]), components, block)

    terms, chosen = _select_and_score(importance, r, list(range(len(outputs))), term_of, _feature_measure(context, importance))
    return _layered_result(terms, chosen, len(outputs))


def _richness_from_partial_spectrum(spectrum: torch.Tensor, components: int, tap: int) -> float:
    """Compute richness_term_from_spectrum where the last entry of `spectrum` is the variance outside the top components."""
    total = float(spectrum.sum())
    if not total > 0.0:
        raise ProxyInvalid(f"block {tap} features have zero variance across the probe samples")
    top = spectrum[:components] / total
    if bool((top <= RELATIVE_ZERO).any()):
        raise ProxyInvalid(f"block {tap} features are rank-deficient within their top {components} principal components")
    return float((0.5 * torch.log(2.0 * math.pi * math.e * top)).sum())


# --------------------------------------------------------------------------------------
# Block gains


def _rademacher(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(0, 2, tuple(shape), generator=generator).to(dtype).mul_(2.0).sub_(1.0)


def _rms_gain(output: torch.Tensor, inputs: torch.Tensor, probes: int, generator: torch.Generator) -> float:
    """Return sqrt(E||J^T u||^2 / dim(output)) over Rademacher u, from Hutchinson's estimate of ||J||_F^2."""
    vectors = _rademacher((probes,) + tuple(output.shape), generator, output.dtype)
    if probes == 1:
        (pulled,) = torch.autograd.grad(output, inputs, vectors[0])
        total = pulled.to(torch.float64).pow(2).sum()
    else:
        # One batched vector-Jacobian product (vmap over the probes) when the operators support it.
        try:
            (pulled,) = torch.autograd.grad(output, inputs, vectors, retain_graph=True, is_grads_batched=True)
            total = pulled.to(torch.float64).pow(2).sum()
        except RuntimeError as error:
            logger.debug("batched vector-Jacobian products are unsupported here (%s); looping over probes", error)
            total = torch.zeros((), dtype=torch.float64)
            for index in range(probes):
                (pulled,) = torch.autograd.grad(output, inputs, vectors[index], retain_graph=index < probes - 1)
                total = total + pulled.to(torch.float64).pow(2).sum()
    return math.sqrt(float(total) / (probes * output.numel()))


def _top_gain(output: torch.Tensor, inputs: torch.Tensor, iterations: int, generator: torch.Generator) -> float:
    """Return the top singular value of the Jacobian by power iteration on J^T J.

    J v is the derivative of the linear map u -> J^T u with respect to u (double backward),
    so no forward-mode support is needed.
    """
    dummy = torch.zeros_like(output, requires_grad=True)
    (pullback,) = torch.autograd.grad(output, inputs, dummy, create_graph=True)
    vector = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype)
    vector = vector / vector.norm()
    sigma = 0.0
    for _ in range(max(1, iterations)):
        (pushed,) = torch.autograd.grad(pullback, dummy, vector, retain_graph=True)  # J v
        sigma = float(pushed.to(torch.float64).norm())
        (normal,) = torch.autograd.grad(output, inputs, pushed, retain_graph=True)  # J^T J v
        norm = normal.norm()
        if float(norm) == 0.0:
            return 0.0
        vector = normal / norm
    return sigma


def estimate_gain(
    block: nn.Module,
    inputs: torch.Tensor,
    *,
    estimator: str = "rms",
    probes: int = 1,
    iterations: int = 20,
    generator: Optional[torch.Generator] = None,
) -> float:
    """Estimate a block's gain at `inputs`: a singular value summary of the Jacobian of the whole batch map.

    `rms` is sqrt(||J||_F^2 / dim(output)) by Hutchinson's estimator with `probes` Rademacher
    vectors (one vector-Jacobian product each). A probe over a batch already averages over
    every sample and position, so one probe is usually within a few percent. `top` is the
    largest singular value by `iterations` steps of power iteration. Returns 0 when the output
    does not depend on the input. BatchNorm statistics come from `inputs`, so call it in
    scoring mode.
    """
    if estimator not in GAIN_ESTIMATORS:
        raise ValueError(f"unknown gain estimator {estimator!r}; expected one of {', '.join(GAIN_ESTIMATORS)}")
    if probes < 1:
        raise ValueError(f"the number of gain probes must be at least 1, got {probes}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.enable_grad():
        leaf = inputs.detach().requires_grad_(True)
        output = block(leaf)
        if not output.requires_grad:
            return 0.0
        if estimator == "rms":
            return _rms_gain(output, leaf, probes, generator)
        return _top_gain(output, leaf, iterations, generator)


def block_gains(
    context: ProbeContext, *, estimator: str = "rms", probes: int = 1, gain_samples: Optional[int] = 8, iterations: int = 20
) -> List[float]:
    """Estimate every block's gain from the block inputs recorded by the shared forward pass.

    Only block l is recomputed, on the first `gain_samples` of its recorded inputs (all when
    None), with BatchNorm on the statistics of those samples. Weights are frozen meanwhile, so
    the backward pass computes input gradients only. Cached per context and settings, so that
    S_GC and S_GI share one estimate.
    """
    if gain_samples is not None and int(gain_samples) < 2:
        raise ValueError(f"gain_samples must be at least 2 (BatchNorm needs two samples) or None, got {gain_samples}")
    key = ("fgnas.gains", estimator, int(probes), gain_samples, int(iterations))
    if key in context.cache:
        return context.cache[key]

    record = context.forward_record((NEEDS_BLOCK_OUTPUTS,))
    network = context.network
    blocks = block_modules(network)
    generator = context.generator(_GAIN_STREAM)
    gains: List[float] = []
    with scoring_mode(network):
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        for block, recorded in zip(blocks, record.block_inputs):
            inputs = recorded if gain_samples is None else recorded[: int(gain_samples)]
            gains.append(
                estimate_gain(block, inputs, estimator=estimator, probes=int(probes), iterations=int(iterations), generator=generator)
            )
    if not all(math.isfinite(g) for g in gains):
        raise ProxyInvalid(f"a block gain is not finite: {gains}")
    context.cache[key] = gains
    return gains


def _reject_zero_gain(gains: Sequence[float]) -> None:
    """Raise ProxyInvalid when a block's output ignores its input.

    Each feature tap feeds the next, so one such block makes the network output constant.
    """
    for block, gain in enumerate(gains):
        if gain <= 0.0:
            raise ProxyInvalid(
                f"block {block} has zero gain: its output does not depend on its input, so the network output is constant"
            )


def stability_term(gain: float) -> float:
    """Return 2^-(sigma + 1/sigma), which is 1/4 at sigma = 1 and falls towards 0 for vanishing or exploding gains."""
    if gain <= 0.0:
        return 0.0
    return 2.0 ** (-(gain + 1.0 / gain))


# --------------------------------------------------------------------------------------
# Gradient proxies (cloud)


def _reject_degenerate(context: ProbeContext) -> None:
    if context.degenerate:
        raise ProxyInvalid(_NO_PATH_REASON)


def _check_gain_options(estimator: str, probes: int) -> None:
    if estimator not in GAIN_ESTIMATORS:
        raise ValueError(f"unknown gain estimator {estimator!r}; expected one of {', '.join(GAIN_ESTIMATORS)}")
    if int(probes) < 1:
        raise ValueError(f"the number of gain probes must be at least 1, got {probes}")


@register_proxy(
    "fgnas_gc",
    needs_gradients=True,
    forward_needs=(NEEDS_BLOCK_OUTPUTS,),
    runs_on=(CLOUD,),
    options={"estimator": "rms", "probes": 1, "gain_samples": 8, "iterations": 20, "r": 1.0, "importance": "term"},
    description="FG-NAS gradient stability: sum over blocks of 2^-(sigma + 1/sigma), sigma the block gain",
)
def gradient_stability(
    context: ProbeContext,
    estimator: str = "rms",
    probes: int = 1,
    gain_samples: Optional[int] = 8,
    iterations: int = 20,
    r: float = 1.0,
    importance: str = "term",
) -> ProxyResult:
    """Sum over blocks of 2^-(sigma_l + 1/sigma_l) (S_GC), largest when every gain is 1.

    The slides print 2^-sigma - 1/sigma, which does not peak at 1 although the slides require it.
    The exponent reading -(sigma + 1/sigma) does.
    """
    _check_gain_options(estimator, probes)
    _check_ratio(r)
    _check_importance(importance, gradients_allowed=True)
    _reject_degenerate(context)
    gains = block_gains(context, estimator=estimator, probes=probes, gain_samples=gain_samples, iterations=iterations)
    _reject_zero_gain(gains)
    measure = None if importance == "term" else _importance_measure(context, importance, gains)
    terms, chosen = _select_and_score(importance, r, list(range(len(gains))), lambda block: stability_term(gains[block]), measure)
    return _layered_result(terms, chosen, len(gains), gains=[float(g) for g in gains])


def _block_weights(network: nn.Module) -> List[List[torch.Tensor]]:
    """Return the conv and linear weights inside each block, each leaf module once."""
    return [
        [module.weight for module in block.modules() if isinstance(module, _WEIGHT_LAYERS)]
        for block in block_modules(network)
    ]


def block_gradient_signal(
    context: ProbeContext, *, micro_batches: int = 2, samples: Optional[int] = None
) -> List[Optional[float]]:
    """Return G_l = sum over the block's conv and linear weights of mean|g| / std(g), per block.

    The first `samples` probe samples (all when None) are split into `micro_batches` parts as
    equal as possible, and each part gets its own cross-entropy gradient from
    `torch.autograd.grad`, so nothing accumulates between them. The std is the population std
    (divisor M), and weights whose gradient does not vary are left out, as in ZiCo. A block
    without weights, or whose every gradient is constant, gets None.
    """
    if micro_batches < 2:
        raise ValueError(f"S_GI needs micro_batches >= 2 to measure gradient variation, got {micro_batches}")
    inputs, labels = context.inputs, context.labels
    if samples is not None:
        inputs, labels = inputs[: int(samples)], labels[: int(samples)]
    if inputs.shape[0] < micro_batches:
        raise ProxyInvalid(
            f"the probe batch has {inputs.shape[0]} samples, fewer than the {micro_batches} micro-batches S_GI needs"
        )

    network = context.network
    per_block = _block_weights(network)
    weights = [w for block in per_block for w in block]
    if not weights:
        raise ProxyInvalid("no block has a convolution or linear layer, so S_GI has no gradients to read")
    # Welford's running mean and sum of squared deviations: identical gradients give exactly zero variance.
    means = [torch.zeros(w.numel(), dtype=torch.float64) for w in weights]
    deviations = [torch.zeros(w.numel(), dtype=torch.float64) for w in weights]
    magnitudes = [torch.zeros(w.numel(), dtype=torch.float64) for w in weights]
    with scoring_mode(network):
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        parts = zip(torch.tensor_split(inputs, micro_batches), torch.tensor_split(labels, micro_batches))
        for count, (part_inputs, part_labels) in enumerate(parts, start=1):
            loss = F.cross_entropy(network(part_inputs), part_labels)
            gradients = torch.autograd.grad(loss, weights, allow_unused=True)
            for index, gradient in enumerate(gradients):
                flat = torch.zeros_like(means[index]) if gradient is None else gradient.detach().reshape(-1).to(torch.float64)
                delta = flat - means[index]
                means[index] += delta / count
                deviations[index] += delta * (flat - means[index])
                magnitudes[index] += flat.abs()

    signals: List[Optional[float]] = []
    position = 0
    for block in per_block:
        total = torch.zeros((), dtype=torch.float64)
        for _ in block:
            std = (deviations[position] / micro_batches).sqrt()
            varying = std > 0.0
            total = total + (magnitudes[position][varying] / micro_batches / std[varying]).sum()
            position += 1
        value = float(total)
        signals.append(value if block and value > 0.0 and math.isfinite(value) else None)
    return signals


@register_proxy(
    "fgnas_gi",
    needs_gradients=True,
    needs_labels=True,
    forward_needs=(NEEDS_BLOCK_OUTPUTS,),
    runs_on=(CLOUD,),
    options={
        "k": 1.0 / 3.0,
        "m": 3.0,
        "micro_batches": 2,
        "samples": 32,
        "estimator": "rms",
        "probes": 1,
        "gain_samples": 8,
        "iterations": 20,
        "r": 1.0,
        "importance": "term",
    },
    description="FG-NAS convergence: sum over blocks with gain in [k, m] of log(sum mean|g| / std(g)) over micro-batches",
)
def gradient_convergence(
    context: ProbeContext,
    k: float = 1.0 / 3.0,
    m: float = 3.0,
    micro_batches: int = 2,
    samples: Optional[int] = 32,
    estimator: str = "rms",
    probes: int = 1,
    gain_samples: Optional[int] = 8,
    iterations: int = 20,
    r: float = 1.0,
    importance: str = "term",
) -> ProxyResult:
    """Sum of log G_l over the blocks whose gain lies in [k, m] (S_GI).

    The slides divide by the number of qualifying blocks. That average loses the signal on
    NAS-Bench-201, so the sum is used. When no block qualifies, every block with a gradient
    signal is used and the result's details contain `gi_fallback: True`.
    """
    if not 0.0 <= float(k) <= float(m):
        raise ValueError(f"the gain interval [k, m] needs 0 <= k <= m, got [{k}, {m}]")
    _check_gain_options(estimator, probes)
    _check_ratio(r)
    _check_importance(importance, gradients_allowed=True)
    _reject_degenerate(context)

    # The interval [0, inf) keeps every block, so the gains are only estimated when they can matter.
    filtering = float(k) > 0.0 or math.isfinite(float(m)) or importance == "gain"
    gains: Optional[List[float]] = None
    if filtering:
        gains = block_gains(context, estimator=estimator, probes=probes, gain_samples=gain_samples, iterations=iterations)
        _reject_zero_gain(gains)
    signals = block_gradient_signal(context, micro_batches=int(micro_batches), samples=samples)
    with_signal = [index for index, signal in enumerate(signals) if signal is not None]
    if not with_signal:
        raise ProxyInvalid("no block has a weight gradient that varies across micro-batches, so every S_GI term is undefined")
    qualifying = [index for index in with_signal if gains is None or float(k) <= gains[index] <= float(m)]
    fallback = not qualifying
    if fallback:
        logger.debug("no block gain lies in [%s, %s] (gains %s); S_GI falls back to every block", k, m, gains)
        qualifying = with_signal

    measure = None if importance == "term" else _importance_measure(context, importance, gains)
    terms, chosen = _select_and_score(importance, r, qualifying, lambda block: math.log(signals[block]), measure)
    listed_gains = None if gains is None else [float(g) for g in gains]
    return _layered_result(terms, chosen, len(signals), gains=listed_gains, gi_fallback=fallback)

