"""FG-NAS: the component proxies, the gain estimators and the population aggregate."""
from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from models.aggregation import (
    AGGREGATES,
    Aggregator,
    AggregatorError,
    aggregate_population,
    expand_proxy_names,
    fit_aggregator,
    label_free_aggregator,
    population_ranks,
)
from models.errors import EdgeNasError
from models.proxies import fgnas
from models.proxies._context import scoring_mode
from models.proxies.scoring import score_architecture
from models.spaces import get_space

COMPONENTS = ["fgnas_fc", "fgnas_fi", "fgnas_gc", "fgnas_gi"]
GOLDEN = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
NO_PATH = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"


def _batch(size=8, side=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, side, side, generator=generator), torch.randint(0, 10, (size,), generator=generator)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread is faster than two threads contending for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nb201():
    return get_space("nb201", num_classes=10, input_size=16)


# --------------------------------------------------------------------------------------
# A toy space whose second block is chosen to break the features in one known way


class _ConstantBlock(nn.Module):
    """Outputs 1 everywhere, whatever the input."""

    def forward(self, x):
        return torch.ones_like(x)


class _SampleMeanBlock(nn.Module):
    """Every feature of a sample equals that sample's mean: zero variance within each sample."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x).contiguous()


class _RankOneBlock(nn.Module):
    """F = s v^T: each sample's features are its mean times one fixed pattern, so F has rank 1."""

    def __init__(self, channels, side):
        super().__init__()
        pattern = torch.linspace(-1.0, 2.0, channels * side * side).reshape(1, channels, side, side)
        self.register_buffer("pattern", pattern)

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True) * self.pattern


class _ToyNetwork(nn.Module):
    def __init__(self, kind, side=8, classes=10):
        super().__init__()
        first = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        second = {"constant": _ConstantBlock(), "sample_mean": _SampleMeanBlock(), "rank_one": _RankOneBlock(4, side)}[kind]
        self.blocks = nn.ModuleList([first, second])
        self.classifier = nn.Linear(4, classes)

    def feature_taps(self):
        return [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.mean(dim=(2, 3)))


class _ToySpace:
    name = "toy"
    num_classes = 10
    input_size = 8

    def build(self, arch):
        return _ToyNetwork(arch)

    def params(self, arch):
        return 1

    def flops(self, arch):
        return 1

    def is_degenerate(self, arch):
        return False


# --------------------------------------------------------------------------------------
# Feature proxies


def _centred_orthonormal(rows, columns, seed=0):
    """rows x columns orthonormal columns, each orthogonal to the all-ones vector."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    matrix = matrix - matrix.mean(dim=0, keepdim=True)
    basis, _ = torch.linalg.qr(matrix)
    return basis


def test_richness_of_known_spectrum():
    batch, width = 6, 20
    singular = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    left = _centred_orthonormal(batch, batch - 1)
    right = _centred_orthonormal(width, batch - 1, seed=1)
    features = left @ torch.diag(singular) @ right.t()  # centred over samples, so the PCA spectrum is singular^2
    variances = singular**2
    # Each component adds ln(2 pi e lambda_i / sum lambda) / 2.
    expected = sum(0.5 * math.log(2 * math.pi * math.e * float(v / variances.sum())) for v in variances)

    spectrum = fgnas.principal_spectrum(features)
    assert torch.allclose(spectrum[: batch - 1], variances, rtol=1e-10)
    assert fgnas.richness_term_from_spectrum(spectrum, batch - 1) == pytest.approx(expected, rel=1e-10)


def test_richness_flags_rank_deficient_spectrum():
    spectrum = torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(fgnas.ProxyInvalid, match="rank-deficient"):
        fgnas.richness_term_from_spectrum(spectrum, 3)


def test_diversity_of_identical_and_orthogonal_samples():
    batch, width = 4, 8
    identical = torch.arange(width, dtype=torch.float32).repeat(batch, 1)
    # Rows of a Hadamard-like sign matrix: orthogonal, each with zero mean.
    orthogonal = torch.tensor(
        [[1, 1, 1, 1, -1, -1, -1, -1], [1, 1, -1, -1, 1, 1, -1, -1], [1, -1, 1, -1, 1, -1, 1, -1], [1, -1, -1, 1, -1, 1, 1, -1]],
        dtype=torch.float32,
    )
    same = fgnas.diversity_term(fgnas.tap_statistics(identical))
    apart = fgnas.diversity_term(fgnas.tap_statistics(orthogonal))
    # Identical rows: rank 1, so nuc / fro = 1, and every Pearson entry is 1, so sum |P| = B^2.
    assert same["term"] == pytest.approx(1.0 / batch**2, rel=1e-6)
    # Orthogonal rows of equal norm: nuc / fro = sqrt(B), and P = I, so sum |P| = B.
    assert apart["term"] == pytest.approx(math.sqrt(batch) / batch, rel=1e-6)
    assert apart["term"] > same["term"]


def test_diversity_unchanged_by_feature_scale():
    features = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    base = fgnas.diversity_term(fgnas.tap_statistics(features))["term"]
    for scale in (1e-3, 7.5, 1e4):
        assert fgnas.diversity_term(fgnas.tap_statistics(features * scale))["term"] == pytest.approx(base, rel=1e-5)


def test_gram_and_pca_nuclear_norms_agree():
    features = torch.randn(8, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = float(torch.linalg.svdvals(features).sum())
    gram = fgnas.diversity_term(fgnas.tap_statistics(features))["nuclear"]
    _, values = fgnas.randomized_svd(features, 8, torch.Generator().manual_seed(0))
    assert gram == pytest.approx(exact, rel=1e-9)
    assert float(values.sum()) == pytest.approx(exact, rel=1e-9)


def test_select_layers_keeps_most_important():
    assert fgnas.select_layers([0.1, 0.9, 0.5, 0.7], 0.5) == [1, 3]
    assert fgnas.select_layers([0.1, 0.9, 0.5, 0.7], 1.0) == [0, 1, 2, 3]
    assert fgnas.select_layers([0.1, 0.9, 0.5, 0.7], 0.1) == [1]
    with pytest.raises(ValueError, match="ratio"):
        fgnas.select_layers([1.0], 0.0)


# --------------------------------------------------------------------------------------
# Gains


def _exact_singular_values(block, inputs):
    with scoring_mode(block):
        output = block(inputs)
        jacobian = torch.autograd.functional.jacobian(block, inputs)
    matrix = jacobian.reshape(output.numel(), inputs.numel()).to(torch.float64)
    return torch.linalg.svdvals(matrix), output.numel()


def _small_blocks():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, bias=False)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
    generator = torch.Generator().manual_seed(1)
    return [
        ("linear", linear, torch.randn(3, 6, generator=generator)),
        ("conv", conv, torch.randn(4, 2, 4, 4, generator=generator)),
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["linear", "conv"])
def test_rms_gain_matches_exact_jacobian(case):
    _, block, inputs = _small_blocks()[case]
    values, output_size = _exact_singular_values(block, inputs)
    exact = math.sqrt(float(values.pow(2).sum()) / output_size)  # RMS over the output dimensions
    with scoring_mode(block):
        estimate = fgnas.estimate_gain(block, inputs, estimator="rms", probes=400, generator=torch.Generator().manual_seed(2))
    assert estimate == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("case", [0, 1], ids=["linear", "conv"])
def test_top_gain_matches_exact_jacobian(case):
    _, block, inputs = _small_blocks()[case]
    values, _ = _exact_singular_values(block, inputs)
    with scoring_mode(block):
        estimate = fgnas.estimate_gain(block, inputs, estimator="top", iterations=200, generator=torch.Generator().manual_seed(2))
    assert estimate == pytest.approx(float(values[0]), rel=1e-3)


def test_stability_term_peaks_at_gain_one():
    peak = fgnas.stability_term(1.0)
    assert peak == pytest.approx(0.25)  # 2^-(1 + 1)
    for gain in (0.25, 0.5, 0.9, 1.1, 2.0, 4.0):
        assert fgnas.stability_term(gain) < peak
    assert fgnas.stability_term(2.0) == pytest.approx(fgnas.stability_term(0.5))
    assert fgnas.stability_term(0.0) == 0.0


# --------------------------------------------------------------------------------------
# Whole proxies on networks


def test_components_valid_on_nb201(nb201):
    inputs, labels = _batch()
    results = score_architecture(nb201, nb201.parse(GOLDEN), inputs, labels, COMPONENTS)
    for name in COMPONENTS:
        assert results[name].valid, (name, results[name].reason)
        assert math.isfinite(results[name].value), name
    gains = results["fgnas_gc"].details["gains"]
    assert len(gains) == 17
    assert results["fgnas_gi"].details["gi_fallback"] is False


def test_same_seed_gives_identical_scores(nb201):
    inputs, labels = _batch()
    first = score_architecture(nb201, nb201.parse(GOLDEN), inputs, labels, COMPONENTS, seed=3)
    second = score_architecture(nb201, nb201.parse(GOLDEN), inputs, labels, COMPONENTS, seed=3)
    for name in COMPONENTS:
        assert first[name].value == second[name].value, name


def test_gain_interval_fallback_is_flagged(nb201):
    inputs, labels = _batch()
    context_options = {"fgnas_gi": {"k": 50.0, "m": 60.0}}
    results = score_architecture(nb201, nb201.parse(ALL_SKIP), inputs, labels, ["fgnas_gi"], options=context_options)
    assert results["fgnas_gi"].valid
    assert results["fgnas_gi"].details["gi_fallback"] is True


def test_layer_ratio_uses_a_subset(nb201):
    inputs, labels = _batch()
    options = {"fgnas_fc": {"r": 0.5}}
    results = score_architecture(nb201, nb201.parse(GOLDEN), inputs, labels, ["fgnas_fc"], options=options)
    details = results["fgnas_fc"].details
    assert len(details["layers_used"]) == 9  # ceil(0.5 * 17)
    assert details["layers_used"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # the widest blocks, earlier ones first on ties
    assert results["fgnas_fc"].value == pytest.approx(sum(details["layer_terms"][i] for i in details["layers_used"]))


def test_gain_importance_rejected_for_feature_proxy(nb201):
    inputs, labels = _batch()
    with pytest.raises(ValueError, match="forward-only"):
        score_architecture(nb201, nb201.parse(GOLDEN), inputs, labels, ["fgnas_fc"], options={"fgnas_fc": {"importance": "gain"}})


def test_no_path_cell_flagged_everywhere(nb201):
    inputs, labels = _batch()
    results = score_architecture(nb201, nb201.parse(NO_PATH), inputs, labels, COMPONENTS)
    for name in COMPONENTS:
        assert not results[name].valid, name
        assert results[name].value is None
        assert results[name].reason


@pytest.mark.parametrize(
    "kind, flagged",
    [
        ("constant", ["fgnas_fc", "fgnas_fi", "fgnas_gc", "fgnas_gi"]),
        ("sample_mean", ["fgnas_fc", "fgnas_fi"]),
        ("rank_one", ["fgnas_fi"]),
    ],
)
def test_broken_features_flagged_not_nan(kind, flagged):
    inputs, labels = _batch(size=8, side=8)
    every_block = {"fgnas_fc": {"r": 1.0}, "fgnas_fi": {"r": 1.0}}
    results = score_architecture(_ToySpace(), kind, inputs, labels, COMPONENTS, options=every_block)
    for name in COMPONENTS:
        result = results[name]
        if name in flagged:
            assert not result.valid, (kind, name, result.value)
            assert result.reason, (kind, name)
        else:
            assert result.valid and math.isfinite(result.value), (kind, name, result.reason)


def test_gradient_signal_matches_direct_computation():
    from models.proxies._context import ProbeContext

    inputs, labels = _batch(size=8, side=8)
    context = ProbeContext(_ToySpace(), "rank_one", inputs, labels, seed=0)
    signals = fgnas.block_gradient_signal(context, micro_batches=2)

    # The slow way: one gradient per half of the batch, then sum of mean|g| / std(g) over varying weights.
    network = context.network
    weight = network.blocks[0][0].weight
    halves = []
    with scoring_mode(network):
        for part in (slice(0, 4), slice(4, 8)):
            loss = torch.nn.functional.cross_entropy(network(inputs[part]), labels[part])
            (gradient,) = torch.autograd.grad(loss, [weight])
            halves.append(gradient.to(torch.float64).flatten())
    stacked = torch.stack(halves)
    std = stacked.std(dim=0, unbiased=False)
    expected = float((stacked.abs().mean(dim=0)[std > 0] / std[std > 0]).sum())
    assert signals[0] == pytest.approx(expected, rel=1e-9)
    assert signals[1] is None  # the rank-one block has no weights


def test_constant_output_flagged_with_default_subset():
    inputs, labels = _batch(size=8, side=8)
    results = score_architecture(_ToySpace(), "constant", inputs, labels, COMPONENTS)
    for name in COMPONENTS:
        assert not results[name].valid, name
        assert results[name].reason, name


# --------------------------------------------------------------------------------------
# Aggregation


def test_expand_proxy_names_dedupes_components():
    proxies, aggregates = expand_proxy_names(["naswot", "fgnas", "fgnas_fc", "fgnas-forward"])
    assert proxies == ["naswot"] + list(AGGREGATES["fgnas"])
    assert aggregates == ["fgnas", "fgnas-forward"]


def test_ranks_put_invalid_entries_last():
    ranks = population_ranks([3.0, float("nan"), 1.0, 2.0, float("nan")])
    assert list(ranks) == [5.0, 1.5, 3.0, 4.0, 1.5]


def _population_with_one_sided_and_middling(count=20):
    """Proxy columns (permutations of 1..count): arch 0 is best on three and worst on one, arch 1 is 10th on all."""
    rng = random.Random(0)
    names = list(AGGREGATES["fgnas"])
    columns = {}
    for position, name in enumerate(names):
        one_sided = 1.0 if position == len(names) - 1 else float(count)
        rest = [float(v) for v in range(1, count + 1) if v not in (one_sided, 10.0)]
        rng.shuffle(rest)
        columns[name] = np.array([one_sided, 10.0] + rest)
    return columns


def test_one_weak_proxy_ranks_below_middling():
    columns = _population_with_one_sided_and_middling()
    static = Aggregator(dynamic=False)
    scores = static.score(columns).scores
    # log-rank: log(1/20) = -3.00 for arch 0, 4 log(10/20) = -2.77 for arch 1.
    assert scores[1] > scores[0]
    # A linear sum of z-scores lets the three strong proxies hide the weak one.
    linear = static.ablated("-NL").score(columns).scores
    assert linear[0] > linear[1]


def test_aggregate_nan_when_nothing_measured():
    columns = {
        "fgnas_fc": [1.0, np.nan, np.nan, 2.0],
        "fgnas_gi": [2.0, 3.0, np.nan, 1.0],
        "fgnas_gc": [1.0, 2.0, np.nan, 3.0],
        "params": [1.0, 2.0, 3.0, 4.0],
    }
    scores = aggregate_population("fgnas", columns)
    assert np.isfinite(scores[[0, 1, 3]]).all()
    assert math.isnan(scores[2])


def test_disagreeing_proxy_gets_zero_weight():
    base = np.arange(30, dtype=float)
    columns = {"fgnas_fc": base, "fgnas_gi": base + 0.5, "fgnas_gc": base[::-1].copy(), "params": base * 2}
    result = label_free_aggregator("fgnas").score(columns)
    assert result.weights["fgnas_gc"] == 0.0
    assert result.weights["fgnas_fc"] == pytest.approx(1.0)


def test_ablations_drop_proxies_and_linearise():
    full = label_free_aggregator("fgnas")
    assert set(full.ablated("-FP").proxies) == {"fgnas_gi", "fgnas_gc", "params"}
    assert set(full.ablated("-GP").proxies) == {"fgnas_fc", "params"}
    assert full.ablated("-NL").nonlinear is False
    with pytest.raises(AggregatorError, match="unknown ablation"):
        full.ablated("-XX")


def _calibration_data(count=30, seed=0):
    rng = np.random.default_rng(seed)
    accuracy = rng.normal(size=count)
    columns = {
        "fgnas_fc": accuracy + rng.normal(scale=0.3, size=count),
        "fgnas_gi": accuracy + rng.normal(scale=0.6, size=count),
        "fgnas_gc": rng.normal(size=count),
        "params": accuracy + rng.normal(scale=1.0, size=count),
    }
    archs = [f"arch-{i}" for i in range(count)]
    return archs, columns, accuracy


def test_aggregator_save_load_round_trip(tmp_path):
    archs, columns, accuracy = _calibration_data()
    fitted = fit_aggregator("nb201", archs, columns, accuracy, {"accuracy": "cifar10_test", "batch_size": 64})
    path = tmp_path / "aggregator.json"
    fitted.save(path)
    loaded = Aggregator.load(path, space="nb201")
    assert loaded == fitted
    assert np.array_equal(loaded.score(columns).scores, fitted.score(columns).scores)
    saved = json.loads(path.read_text())
    assert saved["format_version"] == 1
    assert saved["calibration"]["count"] == len(archs)
    assert saved["protocol"]["accuracy"] == "cifar10_test"


def test_calibration_keeps_or_raises_rho():
    from scipy.stats import spearmanr

    archs, columns, accuracy = _calibration_data()
    fitted = fit_aggregator("nb201", archs, columns, accuracy, {})
    free = label_free_aggregator("fgnas")
    fitted_rho = spearmanr(fitted.score(columns).scores, accuracy).correlation
    free_rho = spearmanr(free.score(columns).scores, accuracy).correlation
    assert fitted_rho >= free_rho
    assert fitted.calibration_spearman == pytest.approx(fitted_rho)


def test_check_disjoint_rejects_calibration_archs():
    archs, columns, accuracy = _calibration_data()
    fitted = fit_aggregator("nb201", archs, columns, accuracy, {})
    fitted.check_disjoint(["other", "another"])
    with pytest.raises(AggregatorError, match="used to calibrate"):
        fitted.check_disjoint(["arch-3", "other"])


def test_aggregator_load_rejects_wrong_space(tmp_path):
    archs, columns, accuracy = _calibration_data()
    path = tmp_path / "aggregator.json"
    fit_aggregator("nb201", archs, columns, accuracy, {}).save(path)
    with pytest.raises(EdgeNasError, match="search space 'nb201', not 'mbv2'"):
        Aggregator.load(path, space="mbv2")


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "something-else"}', "not an edge-nas aggregator file"),
        ('{"format": "edge-nas-aggregator", "format_version": 99}', "unsupported aggregator format version"),
    ],
)
def test_aggregator_load_rejects_wrong_format(tmp_path, content, message):
    path = tmp_path / "aggregator.json"
    path.write_text(content)
    with pytest.raises(AggregatorError, match=message):
        Aggregator.load(path, space="nb201")


def test_aggregator_load_rejects_edited_calibration_list(tmp_path):
    archs, columns, accuracy = _calibration_data()
    path = tmp_path / "aggregator.json"
    fit_aggregator("nb201", archs, columns, accuracy, {}).save(path)
    data = json.loads(path.read_text())
    data["calibration"]["architectures"].pop()
    path.write_text(json.dumps(data))
    with pytest.raises(AggregatorError, match="SHA-256"):
        Aggregator.load(path)


def test_aggregator_load_rejects_binary_file(tmp_path):
    path = tmp_path / "aggregator.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AggregatorError, match="not a UTF-8 text file"):
        Aggregator.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda data: data["parameters"].update(agreement_power="high"), "must be numbers"),
        (lambda data: data["parameters"].update(agreement_power=-1.0), "agreement power must be a positive"),
        (lambda data: data["parameters"]["base_weights"].update(params=-1.0), "finite and non-negative"),
        (lambda data: data.update(protocol=[1, 2]), "'protocol' must be a JSON object"),
    ],
)
def test_aggregator_load_rejects_bad_parameters(tmp_path, edit, message):
    archs, columns, accuracy = _calibration_data()
    path = tmp_path / "aggregator.json"
    fit_aggregator("nb201", archs, columns, accuracy, {}).save(path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(AggregatorError, match=message) as raised:
        Aggregator.load(path)
    assert str(path) in str(raised.value)


def test_aggregator_load_reports_missing_file(tmp_path):
    with pytest.raises(AggregatorError, match="not found"):
        Aggregator.load(tmp_path / "absent.json")


def test_aggregate_rejects_aggregator_of_other_name():
    with pytest.raises(AggregatorError, match="fgnas-forward"):
        aggregate_population("fgnas-forward", {"fgnas_fc": [1.0], "params": [1.0]}, label_free_aggregator("fgnas"))


def test_fallback_on_tiny_population_is_not_a_warning(caplog):
    # Each proxy ranks the four architectures against the others' consensus, so every agreement is below 0.
    columns = {
        "fgnas_fc": [1.0, 2.0, 3.0, 4.0],
        "fgnas_gi": [4.0, 3.0, 2.0, 1.0],
        "fgnas_gc": [1.0, 2.0, 3.0, 4.0],
        "params": [4.0, 3.0, 2.0, 1.0],
    }
    with caplog.at_level(logging.INFO, logger="models.aggregation"):
        result = label_free_aggregator("fgnas").score(columns)
    assert result.fallback
    assert caplog.records
    assert all(record.levelno < logging.WARNING for record in caplog.records)
