"""Baseline gradient proxies (grad_norm, snip, synflow, jacob_cov, zico) against hand computations."""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.proxies import get_proxy
from models.proxies._context import ProbeContext
from models.proxies.scoring import run_proxy, score_architecture
from models.spaces import get_space

BASELINES = ["grad_norm", "snip", "synflow", "jacob_cov", "zico"]
NUM_CLASSES = 3
GOOD_ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_3x3~2|"
DEGENERATE_ARCHS = [
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|",
]


@pytest.fixture(autouse=True)
def single_thread():
    # Tensors this small gain nothing from intra-op threads, and on a loaded machine
    # the threads slow each test down several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """Flatten, optional hidden layer (Linear, optional BatchNorm1d, ReLU), linear classifier."""

    def __init__(self, in_features: int = 12, hidden: int = 0, norm: bool = False, bias: bool = True) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Flatten()]
        width = in_features
        if hidden:
            layers.append(nn.Linear(in_features, hidden, bias=bias))
            if norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            width = hidden
        self.blocks = nn.ModuleList([nn.Sequential(*layers)])
        self.classifier = nn.Linear(width, NUM_CLASSES, bias=bias)

    def feature_taps(self):
        return [("blocks.0", self.blocks[0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks[0](x))


class TinySpace:
    """The parts of the search-space interface that ProbeContext reads. `build` ignores `arch`."""

    num_classes = NUM_CLASSES

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory = factory

    def params(self, arch) -> int:
        return sum(p.numel() for p in self.factory().parameters())

    def flops(self, arch) -> int:
        return 0

    def is_degenerate(self, arch) -> bool:
        return False

    def build(self, arch) -> nn.Module:
        return self.factory()


class UnflaggedSpace:
    """NAS-Bench-201 with `is_degenerate` always False, so only the proxies' own checks can reject."""

    def __init__(self, space) -> None:
        self.space = space
        self.num_classes = space.num_classes

    def params(self, arch) -> int:
        return self.space.params(arch)

    def flops(self, arch) -> int:
        return self.space.flops(arch)

    def is_degenerate(self, arch) -> bool:
        return False

    def build(self, arch) -> nn.Module:
        return self.space.build(arch)


def probe_batch(batch: int, shape=(3, 2, 2), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((batch,) + tuple(shape), generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return inputs, labels


def tiny_context(factory: Callable[[], nn.Module], batch: int = 6, seed: int = 0) -> ProbeContext:
    inputs, labels = probe_batch(batch)
    return ProbeContext(TinySpace(factory), None, inputs, labels, seed=seed)


def score(name: str, context: ProbeContext, **options) -> float:
    result = run_proxy(get_proxy(name), context, options or None)
    assert result.valid, result.reason
    return result.value


def nb201_space():
    return get_space("nb201", num_classes=10, input_size=16)


def nb201_batch(batch: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return inputs, labels


def hand_loss_gradients(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Dict[str, np.ndarray]:
    """Weight gradients of a training-mode copy through `.backward()`, keyed by module name."""
    network = copy.deepcopy(network).train()
    F.cross_entropy(network(inputs), labels).backward()
    return {
        name: module.weight.grad.double().numpy()
        for name, module in network.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


# ---------------------------------------------------------------- grad_norm and snip


def test_grad_norm_matches_softmax_gradient():
    context = tiny_context(TinyNet)
    weight = context.network.classifier.weight.detach().double().numpy()
    bias = context.network.classifier.bias.detach().double().numpy()
    x = context.inputs.reshape(6, -1).double().numpy()
    # For one linear layer, dL/dW = (softmax(x W^T + b) - onehot(y))^T x / B.
    logits = x @ weight.T + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    onehot = np.eye(NUM_CLASSES)[context.labels.numpy()]
    gradient = (probabilities - onehot).T @ x / 6

    assert score("grad_norm", context) == pytest.approx(np.linalg.norm(gradient), rel=1e-5)
    assert score("snip", context) == pytest.approx(np.abs(weight * gradient).sum(), rel=1e-5)


def test_grad_norm_snip_match_parameter_loop():
    context = tiny_context(lambda: TinyNet(hidden=5, norm=True), batch=8)
    gradients = hand_loss_gradients(context.network, context.inputs, context.labels)
    weights = {
        name: module.weight.detach().double().numpy()
        for name, module in context.network.named_modules()
        if isinstance(module, nn.Linear)
    }
    expected_norm = 0.0
    expected_snip = 0.0
    for name, gradient in gradients.items():
        squares = 0.0
        for g, w in zip(gradient.ravel().tolist(), weights[name].ravel().tolist()):
            squares += g * g
            expected_snip += abs(w * g)
        expected_norm += math.sqrt(squares)

    assert len(gradients) == 2
    assert score("grad_norm", context) == pytest.approx(expected_norm, rel=1e-5)
    assert score("snip", context) == pytest.approx(expected_snip, rel=1e-5)


# ---------------------------------------------------------------- synflow


def linear_chain_log_synflow(network: TinyNet) -> float:
    """Closed form for Linear-BN-ReLU-Linear without biases: the score is 2R.

    With |W| weights and eval-mode BatchNorm at default statistics (a factor s = 1/sqrt(1 + eps)),
    R = s * 1^T |W2| |W1| 1, and R is linear in each weight matrix, so each layer's
    sum of |W * dR/dW| equals R (Euler's theorem).
    """
    first = np.abs(network.blocks[0][1].weight.detach().double().numpy())
    second = np.abs(network.classifier.weight.detach().double().numpy())
    scale = 1.0 / math.sqrt(1.0 + network.blocks[0][2].eps)
    total = scale * (second @ first @ np.ones(first.shape[1])).sum()
    return math.log(2.0 * total)


def test_synflow_matches_linear_closed_form():
    context = tiny_context(lambda: TinyNet(hidden=5, norm=True, bias=False))

    assert score("synflow", context) == pytest.approx(linear_chain_log_synflow(context.network), rel=1e-12)


def test_synflow_log_beyond_float32_range():
    def huge() -> TinyNet:
        network = TinyNet(hidden=5, norm=True, bias=False)
        with torch.no_grad():
            network.blocks[0][1].weight.mul_(1e25)
            network.classifier.weight.mul_(1e25)
        return network

    context = tiny_context(huge)
    expected = linear_chain_log_synflow(context.network)

    assert expected > math.log(np.finfo(np.float32).max)
    assert score("synflow", context) == pytest.approx(expected, rel=1e-12)


def test_synflow_leaves_context_network_untouched():
    context = tiny_context(lambda: TinyNet(hidden=5, norm=True))
    before = {k: v.clone() for k, v in context.network.state_dict().items()}
    score("synflow", context)
    after = context.network.state_dict()

    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
    assert context.network.training


# ---------------------------------------------------------------- jacob_cov


def test_jacob_cov_matches_sample_loop():
    context = tiny_context(lambda: TinyNet(hidden=8), batch=6)
    rows = []
    for i in range(6):
        sample = context.inputs[i : i + 1].clone().requires_grad_(True)
        context.network(sample).sum().backward()
        rows.append(sample.grad.reshape(-1).double().numpy())
    context.network.zero_grad(set_to_none=True)
    eigenvalues = np.linalg.eigvalsh(np.corrcoef(np.stack(rows)))
    shifted = np.clip(eigenvalues, 0.0, None) + 1e-5
    expected = -np.sum(np.log(shifted) + 1.0 / shifted)

    assert score("jacob_cov", context) == pytest.approx(expected, rel=1e-6)


def test_jacob_cov_needs_two_samples():
    context = tiny_context(lambda: TinyNet(hidden=8), batch=1)
    result = run_proxy(get_proxy("jacob_cov"), context)

    assert not result.valid
    assert "at least 2" in result.reason


# ---------------------------------------------------------------- zico


def hand_zico(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, bounds: List[int]) -> float:
    """ZiCo by a loop over micro-batches with `.backward()` and numpy statistics."""
    network = copy.deepcopy(network).train()
    layers = [m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    collected: List[List[np.ndarray]] = [[] for _ in layers]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        network.zero_grad(set_to_none=True)
        F.cross_entropy(network(inputs[start:stop]), labels[start:stop]).backward()
        for store, layer in zip(collected, layers):
            store.append(layer.weight.grad.double().numpy().ravel().copy())
    total = 0.0
    for store in collected:
        gradients = np.stack(store)
        std = gradients.std(axis=0)
        varying = std > 0
        layer_sum = (np.abs(gradients).mean(axis=0)[varying] / std[varying]).sum()
        if layer_sum > 0:
            total += math.log(layer_sum)
    return total


def test_zico_matches_micro_batch_loop():
    context = tiny_context(lambda: TinyNet(hidden=5, norm=True), batch=8)
    expected = hand_zico(context.network, context.inputs, context.labels, [0, 4, 8])

    assert score("zico", context) == pytest.approx(expected, rel=1e-6)


def test_zico_uneven_micro_batches():
    context = tiny_context(lambda: TinyNet(hidden=5, norm=True), batch=7)
    # torch.tensor_split(7 samples, 3) gives sizes 3, 2, 2.
    expected = hand_zico(context.network, context.inputs, context.labels, [0, 3, 5, 7])

    assert score("zico", context, micro_batches=3) == pytest.approx(expected, rel=1e-6)


def test_zico_rejects_too_small_batch():
    context = tiny_context(lambda: TinyNet(hidden=5), batch=2)
    result = run_proxy(get_proxy("zico"), context, {"micro_batches": 3})

    assert not result.valid
    assert "fewer than the 3 micro-batches" in result.reason


def test_zico_rejects_single_micro_batch():
    context = tiny_context(lambda: TinyNet(hidden=5), batch=4)

    with pytest.raises(ValueError, match="micro_batches >= 2"):
        run_proxy(get_proxy("zico"), context, {"micro_batches": 1})


# ---------------------------------------------------------------- all baselines


def test_baselines_declare_their_needs():
    for name in BASELINES:
        spec = get_proxy(name)
        assert spec.needs_gradients, name
        assert spec.higher_is_better, name
    assert get_proxy("grad_norm").needs_labels
    assert get_proxy("snip").needs_labels
    assert get_proxy("zico").needs_labels
    assert not get_proxy("synflow").needs_labels
    assert not get_proxy("jacob_cov").needs_labels
    assert get_proxy("zico").default_options() == {"micro_batches": 2}


@pytest.mark.parametrize("name", BASELINES)
def test_scoring_restores_network_state(name):
    space = nb201_space()
    inputs, labels = nb201_batch()
    context = ProbeContext(space, space.parse(GOOD_ARCH), inputs, labels, seed=0)
    network = context.network
    network.head_norm.eval()  # a mixed state, to check that each flag comes back as it was
    flags = {n: m.training for n, m in network.named_modules()}
    state = {k: v.clone() for k, v in network.state_dict().items()}
    result = run_proxy(get_proxy(name), context)

    assert result.valid, result.reason
    assert {n: m.training for n, m in network.named_modules()} == flags
    for key, value in network.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in network.parameters())
    assert all(p.requires_grad for p in network.parameters())


@pytest.mark.parametrize("arch", DEGENERATE_ARCHS)
def test_degenerate_architecture_is_invalid(arch):
    space = nb201_space()
    inputs, labels = nb201_batch()
    results = score_architecture(space, space.parse(arch), inputs, labels, BASELINES)

    for name, result in results.items():
        assert not result.valid, name
        assert result.value is None, name
        assert "no path" in result.reason, name


def test_unflagged_constant_output_is_invalid():
    space = nb201_space()
    inputs, labels = nb201_batch()
    arch = space.parse(DEGENERATE_ARCHS[1])
    results = score_architecture(UnflaggedSpace(space), arch, inputs, labels, BASELINES)

    for name, result in results.items():
        assert not result.valid, name
        assert result.reason, name
        assert "non-finite" not in result.reason, name


def test_same_seed_gives_identical_values():
    space = nb201_space()
    inputs, labels = nb201_batch()
    arch = space.parse(GOOD_ARCH)
    first = score_architecture(space, arch, inputs, labels, BASELINES, seed=3)
    second = score_architecture(space, arch, inputs, labels, BASELINES, seed=3)
    other_seed = score_architecture(space, arch, inputs, labels, ["grad_norm"], seed=4)

    for name in BASELINES:
        assert first[name].valid, first[name].reason
        assert first[name].value == second[name].value, name
    assert other_seed["grad_norm"].value != first["grad_norm"].value
