import numpy as np
import pytest
import torch

from models.errors import UnknownNameError
from models.proxies import get_proxy, list_proxies
from models.proxies._context import ProbeContext, build_seeded, record_forward, scoring_mode
from models.proxies._registry import NEEDS_BLOCK_OUTPUTS, NEEDS_RELU_KERNEL
from models.proxies.scoring import score_architecture
from models.spaces import get_space

GOLDEN = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


@pytest.fixture
def space():
    return get_space("nb201", num_classes=10, input_size=16)


def _batch(size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def test_scoring_mode_restores_buffers_flags_and_grads(space):
    network = space.build(space.parse(GOLDEN)).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    inputs, labels = _batch()
    with scoring_mode(network):
        assert all(m.training for m in network.modules())
        torch.nn.functional.cross_entropy(network(inputs), labels).backward()
    assert not any(m.training for m in network.modules())
    after = network.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in network.parameters())


def test_scoring_mode_restores_state_on_exception(space):
    network = space.build(space.parse(GOLDEN)).eval()
    before = {k: v.clone() for k, v in network.named_buffers()}
    with pytest.raises(RuntimeError):
        with scoring_mode(network):
            network(_batch()[0])
            raise RuntimeError("boom")
    assert not network.training
    for key, value in network.named_buffers():
        assert torch.equal(value, before[key])


def test_forward_record_removes_every_hook(space):
    network = space.build(space.parse(GOLDEN))
    record_forward(network, _batch()[0], {NEEDS_BLOCK_OUTPUTS, NEEDS_RELU_KERNEL})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in network.modules())


def test_relu_kernel_equals_explicit_hamming_count(space):
    network = build_seeded(lambda: space.build(space.parse(GOLDEN)), 0)
    inputs = _batch()[0]
    record = record_forward(network, inputs, {NEEDS_RELU_KERNEL})
    codes = []

    def keep(module, args):
        codes.append((args[0].detach().reshape(len(inputs), -1) > 0).numpy())

    handles = [m.register_forward_pre_hook(keep) for m in network.modules() if isinstance(m, torch.nn.ReLU)]
    with scoring_mode(network), torch.no_grad():
        network(inputs)
    for handle in handles:
        handle.remove()
    bits = np.concatenate(codes, axis=1)
    # Agreements between samples i and j: units where both codes are equal.
    expected = (bits[:, None, :] == bits[None, :, :]).sum(axis=2).astype(np.float64)
    assert np.array_equal(record.relu_kernel.numpy(), expected)


def test_naswot_is_logdet_of_kernel(space):
    inputs, labels = _batch()
    arch = space.parse(GOLDEN)
    result = score_architecture(space, arch, inputs, labels, ["naswot"], seed=0)["naswot"]
    context = ProbeContext(space, arch, inputs, labels, seed=0)
    kernel = context.forward_record({NEEDS_RELU_KERNEL}).relu_kernel.numpy()
    assert result.valid
    assert result.value == pytest.approx(np.linalg.slogdet(kernel)[1], rel=1e-9)


def test_naswot_flags_identical_samples(space):
    inputs = _batch()[0][:1].repeat(4, 1, 1, 1)
    result = score_architecture(space, space.parse(GOLDEN), inputs, None, ["naswot"])["naswot"]
    assert not result.valid
    assert result.value is None
    assert "singular" in result.reason


def test_cost_proxies_match_space(space):
    arch = space.parse(GOLDEN)
    results = score_architecture(space, arch, *_batch(), ["params", "flops"])
    assert results["params"].value == space.params(arch)
    assert results["flops"].value == space.flops(arch)


def test_scoring_is_seeded_and_scoped(space):
    inputs, labels = _batch()
    arch = space.parse(GOLDEN)
    state = torch.random.get_rng_state()
    first = score_architecture(space, arch, inputs, labels, ["naswot"], seed=5)["naswot"].value
    second = score_architecture(space, arch, inputs, labels, ["naswot"], seed=5)["naswot"].value
    other = score_architecture(space, arch, inputs, labels, ["naswot"], seed=6)["naswot"].value
    assert first == second
    assert first != other
    assert torch.equal(state, torch.random.get_rng_state())


def test_every_proxy_declares_itself():
    for name in list_proxies():
        spec = get_proxy(name)
        assert spec.runs_on
        assert spec.runs_on <= {"device", "cloud"}
        assert spec.batches >= 0
        assert spec.description


def test_unknown_proxy_lists_known_names():
    with pytest.raises(UnknownNameError, match="naswot"):
        get_proxy("nasw0t")
