"""Zen-NAS and TE-NAS proxies checked against explicit computations on tiny networks."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.proxies import get_proxy
from models.proxies._context import ProbeContext
from models.proxies.scoring import run_proxy, score_architecture
from models.proxies.tenas import count_activation_patterns, ntk_condition_number, tenas_rank_combine
from models.proxies.zen import zen_score_once
from models.spaces import get_space

NO_PATH = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
# Node 1 has no input edge, so the 3x3 conv on edge 1 -> 2 reads zeros in every cell.
CUT_BRANCH = "|none~0|+|skip_connect~0|nor_conv_3x3~1|+|none~0|none~1|nor_conv_3x3~2|"
SMALL = "|nor_conv_1x1~0|+|skip_connect~0|avg_pool_3x3~1|+|none~0|nor_conv_1x1~1|skip_connect~2|"

PROXIES = ["zen", "tenas_ntk", "tenas_regions", "tenas"]
# Small batches keep each NB201 scoring under a second on two CPU cores.
SMALL_OPTIONS = {
    "tenas_ntk": {"batch_size": 4},
    "tenas_regions": {"batch_size": 8, "network": "probe"},
    "tenas": {"ntk_batch_size": 4, "regions_batch_size": 8},
}


@pytest.fixture
def space():
    return get_space("nb201", num_classes=10, input_size=16)


def _probe(size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator)


def _score(space, arch_text, seed=0, proxies=PROXIES):
    return score_architecture(
        space, space.parse(arch_text), _probe(), None, proxies, seed=seed, options=SMALL_OPTIONS
    )


class TinyConvNet(nn.Module):
    """conv 3x3 -> BatchNorm -> ReLU -> conv 1x1 with bias, all of it the feature map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.project = nn.Conv2d(3, 2, 1, bias=True)

    def forward_features(self, x):
        return self.project(self.relu(self.norm(self.conv(x))))

    def forward(self, x):
        return self.forward_features(x).mean(dim=(2, 3))


def _tiny_mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index + 2 < len(widths):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- Zen-NAS


def test_zen_delta_matches_explicit_computation():
    network = TinyConvNet()
    alpha = 0.01
    shape = (6, 2, 5, 5)
    with torch.no_grad():
        score, delta, log_scale_sum, constant = zen_score_once(
            network.train(), shape, alpha, torch.Generator().manual_seed(7)
        )

    # Same stream by hand: conv weight, projection weight (the bias is zeroed), x, eps.
    generator = torch.Generator().manual_seed(7)
    conv_weight = torch.randn(3, 2, 3, 3, generator=generator).double()
    project_weight = torch.randn(2, 3, 1, 1, generator=generator).double()
    x = torch.randn(shape, generator=generator).double()
    eps = torch.randn(shape, generator=generator).double()

    def features(inputs):
        pre_norm = F.conv2d(inputs, conv_weight, padding=1)
        mean = pre_norm.mean(dim=(0, 2, 3), keepdim=True)
        variance = pre_norm.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        normalised = (pre_norm - mean) / torch.sqrt(variance + 1e-5)
        return F.conv2d(torch.relu(normalised), project_weight), variance

    clean, variance = features(x)
    moved, _ = features(x + alpha * eps)
    expected_delta = float((clean - moved).reshape(6, -1).norm(dim=1).mean()) / alpha
    expected_log_scale = 0.5 * math.log(float(variance.mean()))

    assert delta == pytest.approx(expected_delta, rel=1e-4)
    assert log_scale_sum == pytest.approx(expected_log_scale, rel=1e-5)
    assert score == pytest.approx(math.log(expected_delta) + expected_log_scale, rel=1e-4)
    assert constant == 0


def test_zen_skips_batchnorm_on_cut_branch(space):
    result = _score(space, CUT_BRANCH, proxies=["zen"])["zen"]
    assert result.valid, result.reason
    assert math.isfinite(result.value)
    # One conv in each of the 15 cells reads the empty node 1.
    assert result.details["constant_batchnorm_inputs"] == 15


# ---------------------------------------------------------------------------- TE-NAS: NTK


def test_ntk_condition_number_matches_jacobian():
    network = _tiny_mlp([3, 5, 2], seed=0)
    inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    condition, largest, smallest = ntk_condition_number(network, inputs)

    # Jacobian row i: gradient of sample i's summed logits, one sample at a time.
    parameters = tuple(p.detach().clone() for p in network.parameters())

    def summed_logits(sample):
        def function(w1, b1, w2, b2):
            return (torch.relu(sample @ w1.t() + b1) @ w2.t() + b2).sum()

        return function

    rows = []
    for sample in inputs:
        jacobian = torch.autograd.functional.jacobian(summed_logits(sample), parameters)
        rows.append(torch.cat([block.reshape(-1) for block in jacobian]))
    singular_values = np.linalg.svd(torch.stack(rows).double().numpy(), compute_uv=False)

    # The NTK's eigenvalues are the squared singular values of the Jacobian.
    assert largest == pytest.approx(singular_values[0] ** 2, rel=1e-5)
    assert smallest == pytest.approx(singular_values[-1] ** 2, rel=1e-4)
    assert condition == pytest.approx((singular_values[0] / singular_values[-1]) ** 2, rel=1e-4)


def test_ntk_restores_requires_grad_and_grads():
    network = _tiny_mlp([3, 5, 2], seed=0)
    network[0].weight.requires_grad_(False)
    ntk_condition_number(network, torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    assert not network[0].weight.requires_grad
    assert network[2].weight.requires_grad
    assert all(p.grad is None for p in network.parameters())


# ---------------------------------------------------------------------------- TE-NAS: linear regions


def test_region_count_on_hand_enumerated_network():
    # Layer 1 is the identity, so its pattern is the quadrant. Layer 2 computes
    # relu(x1) - relu(x2), which splits quadrant I along x1 = x2 and nothing else.
    network = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU())
    with torch.no_grad():
        network[0].weight.copy_(torch.eye(2))
        network[0].bias.zero_()
        network[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        network[2].bias.zero_()
    points = torch.tensor(
        [
            [2.0, 1.0], [3.0, 1.0],  # quadrant I, x1 > x2
            [1.0, 2.0],  # quadrant I, x1 < x2
            [-1.0, 1.0], [-3.0, 4.0],  # quadrant II
            [-1.0, -1.0],  # quadrant III
            [1.0, -2.0], [5.0, -0.5],  # quadrant IV
        ]
    )
    patterns, units = count_activation_patterns(network, points)
    assert patterns == 5
    assert units == 3


def test_region_count_matches_brute_force_pattern_set():
    network = _tiny_mlp([2, 4, 3, 1], seed=3)
    points = torch.rand(200, 2, generator=torch.Generator().manual_seed(4)) * 6 - 3
    patterns, _ = count_activation_patterns(network, points)

    with torch.no_grad():
        hidden_1 = network[0](points)
        hidden_2 = network[2](torch.relu(hidden_1))
    codes = torch.cat([hidden_1 > 0, hidden_2 > 0], dim=1)
    expected = {tuple(row.tolist()) for row in codes}
    assert 1 < len(expected) < 200  # the case must neither collapse nor saturate
    assert patterns == len(expected)


def test_region_count_without_relu_is_one():
    patterns, units = count_activation_patterns(nn.Linear(2, 3), torch.randn(5, 2))
    assert patterns == 1
    assert units == 0


# ---------------------------------------------------------------------------- TE-NAS: combination


def test_tenas_rank_combine_sums_ranks():
    # NTK ranks (higher value is better) are [3, 1, 2]. Region ranks, with the tie averaged, are [1, 2.5, 2.5].
    combined = tenas_rank_combine([-1.0, -3.0, -2.0], [1.0, 2.0, 2.0])
    np.testing.assert_allclose(combined, [4.0, 3.5, 4.5])


def test_tenas_rank_combine_rejects_invalid_input():
    with pytest.raises(ValueError, match="non-finite"):
        tenas_rank_combine([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="equal length"):
        tenas_rank_combine([1.0, 2.0], [1.0])


def test_tenas_is_regions_minus_log_condition(space):
    results = _score(space, SMALL)
    for name in PROXIES:
        assert results[name].valid, (name, results[name].reason)
    expected = results["tenas_regions"].value + results["tenas_ntk"].value
    assert results["tenas"].value == pytest.approx(expected, rel=1e-12)
    assert results["tenas_ntk"].value == pytest.approx(-math.log(results["tenas"].details["condition_number"]))


# ---------------------------------------------------------------------------- scoring conditions


def test_proxies_declare_their_needs():
    assert not get_proxy("zen").needs_gradients
    assert not get_proxy("tenas_regions").needs_gradients
    assert get_proxy("tenas_ntk").needs_gradients
    assert get_proxy("tenas").needs_gradients
    assert get_proxy("zen").default_options() == {"alpha": 0.01, "repeats": 1}
    for name in PROXIES:
        assert get_proxy(name).higher_is_better
        assert not get_proxy(name).needs_labels


def test_no_path_architecture_results(space):
    results = _score(space, NO_PATH)
    for name in ("zen", "tenas_ntk", "tenas"):
        assert not results[name].valid, name
        assert results[name].value is None
        assert results[name].reason
    # Every sample gets the same all-zero pattern, so there is one region and the value is defined.
    assert results["tenas_regions"].valid
    assert results["tenas_regions"].value == 0.0


def test_thin_copy_keeps_the_cell(space):
    arch = space.parse(SMALL)
    thin = space.build_thin(arch)
    full = space.build(arch)
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in full.parameters()) / 100
    assert sum(isinstance(block, type(full.blocks[0])) for block in thin.blocks) == 3
    assert thin(torch.randn(5, 3, 3, 3)).shape == (5, 10)


def test_thin_regions_count_tiny_inputs(space):
    arch = space.parse(SMALL)
    options = {"tenas_regions": {"batch_size": 200}}
    result = score_architecture(space, arch, _probe(), None, ["tenas_regions"], options=options)["tenas_regions"]
    probe = {"tenas_regions": {"batch_size": 200, "network": "probe"}}
    full = score_architecture(space, arch, _probe(), None, ["tenas_regions"], options=probe)["tenas_regions"]
    assert result.details["regions_network"] == "thin"
    assert 1 < result.details["linear_regions"] <= 200
    assert result.details["relu_units"] * 100 < full.details["relu_units"]
    assert result.value == pytest.approx(math.log(result.details["linear_regions"]))


def test_regions_fall_back_without_thin_copy():
    space = get_space("mobilenetv2", num_classes=10, input_size=32, width_mult=0.35)
    arch = space.sample(random.Random(0))
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = score_architecture(space, arch, inputs, None, ["tenas_regions"], options={"tenas_regions": {"batch_size": 8}})
    assert result["tenas_regions"].details["regions_network"] == "probe"


def test_scoring_leaves_global_rng_unchanged(space):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _score(space, SMALL)
    assert torch.equal(torch.get_rng_state(), before)


def test_same_seed_gives_identical_values(space):
    first = _score(space, SMALL, seed=5)
    second = _score(space, SMALL, seed=5)
    other = _score(space, SMALL, seed=6)
    for name in PROXIES:
        assert first[name].value == second[name].value, name
    assert other["zen"].value != first["zen"].value
    assert other["tenas_ntk"].value != first["tenas_ntk"].value


def test_scoring_restores_network_state(space):
    context = ProbeContext(space, space.parse(SMALL), _probe(), None, seed=0)
    network = context.network.eval()
    before = {key: value.clone() for key, value in network.state_dict().items()}
    for name in PROXIES:
        result = run_proxy(get_proxy(name), context, SMALL_OPTIONS.get(name))
        assert result.valid, (name, result.reason)

    after = network.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(module.training for module in network.modules())
    assert all(p.requires_grad and p.grad is None for p in network.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in network.modules())
