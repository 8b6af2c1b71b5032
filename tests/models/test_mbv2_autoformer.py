"""The MobileNetV2 and AutoFormer search spaces: golden costs, analytic against built counts, validation, proxies."""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from models.errors import InvalidArchitectureError, UnknownNameError
from models.proxies import get_proxy, list_proxies
from models.proxies.scoring import score_architecture
from models.spaces import get_space, list_spaces
from models.spaces import autoformer, mobilenetv2
from models.spaces._autoformer_net import AttentionProducts
from models.spaces.autoformer import AUTOFORMER_B, AUTOFORMER_S, AUTOFORMER_T, AutoFormerArch
from models.spaces.mobilenetv2 import MOBILENETV2_1_0, MobileNetV2Arch

MBV2_1_0_TEXT = "k3e6-k3e6_k3e6-k3e6-k3e6_k3e6-k3e6-k3e6-k3e6_k3e6-k3e6-k3e6_k3e6-k3e6-k3e6_k3e6"
AUTOFORMER_T_TEXT = "e192_h3m3.5-h3m3.5-h3m3.0-h3m3.5-h3m3.0-h3m3.0-h3m4.0-h3m4.0-h3m3.5-h3m4.0-h4m3.5-h3m4.0-h3m3.5"
AUTOFORMER_SPACES = ["autoformer-tiny", "autoformer-small", "autoformer-base"]

# Tiny settings for every check that builds a network.
TINY_MBV2 = {"input_size": 32, "width_mult": 0.35, "num_classes": 10}
TINY_AUTOFORMER = {"input_size": 32, "num_classes": 10}


@pytest.fixture(autouse=True)
def single_thread():
    # These networks are small, and on a shared machine intra-op threads slow each test down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_macs(network: nn.Module, input_size: int) -> int:
    """Slow count: multiply-adds of convolutions, linear layers and attention products, read from hooks on a real forward pass."""
    total = []

    def on_conv(module, args, output):
        per_output = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total.append(output[0].numel() * per_output)

    def on_linear(module, args, output):
        total.append(output[0].numel() * module.in_features)

    def on_attention(module, args, output):
        query, key, value = (tensor[0] for tensor in args)  # heads x tokens x head_dim
        heads, tokens, head_dim = query.shape
        total.append(heads * tokens * key.shape[1] * head_dim + heads * tokens * key.shape[1] * value.shape[2])

    handlers = {nn.Conv2d: on_conv, nn.Linear: on_linear, AttentionProducts: on_attention}
    handles = [
        module.register_forward_hook(handlers[type(module)]) for module in network.modules() if type(module) in handlers
    ]
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
    return sum(total)


# --------------------------------------------------------------------------------------
# Golden values


def test_mobilenetv2_1_0_golden_costs():
    space = get_space("mobilenetv2")
    arch = space.parse(MBV2_1_0_TEXT)
    assert arch == MOBILENETV2_1_0
    assert arch.depths == (2, 3, 4, 3, 3)
    # The torchvision documentation of mobilenet_v2 lists 3,504,872 parameters and 0.30 GFLOPS.
    assert space.params(arch) == 3_504_872
    assert space.flops(arch) == 300_774_272


def test_mobilenetv2_1_0_built_at_224_matches_counts():
    space = get_space("mobilenetv2")
    network = space.build(MOBILENETV2_1_0)
    assert sum(p.numel() for p in network.parameters()) == 3_504_872
    assert count_macs(network, 224) == 300_774_272
    assert len(network.feature_taps()) == 1 + sum(MOBILENETV2_1_0.depths) + 1


def test_autoformer_t_released_subnet_golden_costs():
    space = get_space("autoformer-tiny")
    arch = space.parse(AUTOFORMER_T_TEXT)
    assert arch == AUTOFORMER_T
    # Exact values from these formulas, checked against built networks by the tests below.
    assert space.params(arch) == 5_768_104
    assert 5.7e6 <= space.params(arch) <= 5.8e6
    assert space.flops(arch) == 1_283_236_352


def test_autoformer_t_built_at_224_matches_params():
    network = get_space("autoformer-tiny").build(AUTOFORMER_T)
    assert sum(p.numel() for p in network.parameters()) == 5_768_104
    assert len(network.feature_taps()) == 13


@pytest.mark.parametrize(
    "space_name,arch,listed_params",
    [
        ("autoformer-tiny", AUTOFORMER_T, 5.8e6),
        ("autoformer-small", AUTOFORMER_S, 22.9e6),
        ("autoformer-base", AUTOFORMER_B, 53.7e6),
    ],
)
def test_autoformer_released_subnets_near_readme(space_name, arch, listed_params):
    # The AutoFormer README lists these parameter counts. Its models add relative-position
    # tables (7,680 parameters per layer) that these spaces leave out, so allow 1%.
    space = get_space(space_name)
    assert abs(space.params(arch) / listed_params - 1) < 0.01


# --------------------------------------------------------------------------------------
# Analytic counts against the built network


def _mbv2_cases():
    space = get_space("mobilenetv2")
    return [
        MOBILENETV2_1_0,
        mobilenetv2.smallest_arch(),
        mobilenetv2.largest_arch(),
        space.sample(random.Random(7)),
    ]


@pytest.mark.parametrize("arch", _mbv2_cases(), ids=["v2-1.0", "smallest", "largest", "sampled"])
@pytest.mark.parametrize("options", [TINY_MBV2, {"input_size": 64, "width_mult": 0.5, "num_classes": 7}])
def test_mobilenetv2_analytic_counts_match_built(arch, options):
    space = get_space("mobilenetv2", **options)
    network = space.build(arch)
    assert space.params(arch) == sum(p.numel() for p in network.parameters())
    assert space.flops(arch) == count_macs(network, options["input_size"])


@pytest.mark.parametrize("space_name", AUTOFORMER_SPACES)
@pytest.mark.parametrize("corner", ["smallest", "largest", "sampled"])
def test_autoformer_analytic_counts_match_built(space_name, corner):
    space = get_space(space_name, **TINY_AUTOFORMER)
    arch = {
        "smallest": space.smallest_arch(),
        "largest": space.largest_arch(),
        "sampled": space.sample(random.Random(5)),
    }[corner]
    network = space.build(arch)
    assert space.params(arch) == sum(p.numel() for p in network.parameters())
    assert space.flops(arch) == count_macs(network, TINY_AUTOFORMER["input_size"])


def test_autoformer_counts_match_built_at_64_pixels():
    space = get_space("autoformer-tiny", input_size=64, num_classes=3)
    network = space.build(AUTOFORMER_T)
    assert space.params(AUTOFORMER_T) == sum(p.numel() for p in network.parameters())
    assert space.flops(AUTOFORMER_T) == count_macs(network, 64)


@pytest.mark.parametrize("space_name", ["mobilenetv2"] + AUTOFORMER_SPACES)
def test_cost_range_bounds_sampled_costs(space_name):
    space = get_space(space_name)
    ranges = space.cost_range()
    rng = random.Random(0)
    for _ in range(200):
        arch = space.sample(rng)
        assert ranges["params"][0] <= space.params(arch) <= ranges["params"][1]
        assert ranges["flops"][0] <= space.flops(arch) <= ranges["flops"][1]


def test_mobilenetv2_cost_range_values():
    ranges = get_space("mobilenetv2").cost_range()
    assert ranges["params"] == (2_320_168, 4_340_456)
    assert ranges["flops"] == (136_609_376, 525_973_568)


# --------------------------------------------------------------------------------------
# Feature taps


@pytest.mark.parametrize(
    "space_name,options,arch",
    [("mobilenetv2", TINY_MBV2, MOBILENETV2_1_0), ("autoformer-tiny", TINY_AUTOFORMER, AUTOFORMER_T)],
)
def test_taps_chain_block_to_block(space_name, options, arch):
    network = get_space(space_name, **options).build(arch).eval()
    inputs, outputs = [], []

    def record(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    taps = [module for _, module in network.feature_taps()]
    handles = [module.register_forward_hook(record) for module in taps]
    with torch.no_grad():
        logits = network(torch.randn(2, 3, options["input_size"], options["input_size"]))
    for handle in handles:
        handle.remove()
    assert logits.shape == (2, options["num_classes"])
    assert len(outputs) == len(taps)
    for previous_output, next_input in zip(outputs, inputs[1:]):
        assert next_input is previous_output


def test_autoformer_taps_output_tokens():
    network = get_space("autoformer-tiny", **TINY_AUTOFORMER).build(AUTOFORMER_T).eval()
    outputs = []
    handle = network.blocks[0].register_forward_hook(lambda m, a, o: outputs.append(o))
    with torch.no_grad():
        network(torch.randn(2, 3, 32, 32))
    handle.remove()
    # 2x2 patches plus the class token, embedding dimension 192.
    assert outputs[0].shape == (2, 5, 192)


# --------------------------------------------------------------------------------------
# Parsing and validation


def test_mobilenetv2_string_round_trip():
    space = get_space("mobilenetv2")
    arch = space.sample(random.Random(11))
    assert space.parse(space.to_string(arch)) == arch
    assert space.parse("  " + MBV2_1_0_TEXT + "\n") == MOBILENETV2_1_0


def test_autoformer_string_round_trip_and_ratio_forms():
    space = get_space("autoformer-small")
    arch = space.sample(random.Random(11))
    assert space.parse(space.to_string(arch)) == arch
    written_as_integer = AUTOFORMER_T_TEXT.replace("m3.0", "m3")
    assert get_space("autoformer-tiny").parse(written_as_integer) == AUTOFORMER_T


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("k3e6-k3e6_k3e6-k3e6-k3e6", ["expected 6 stages", "found 2"]),
        ("", ["expected 6 stages", "found 1"]),
        (MBV2_1_0_TEXT.replace("k3e6-k3e6_", "k3e6_", 1), ["stage 1 has 1 blocks", "allowed depths: 2, 3, 4"]),
        (MBV2_1_0_TEXT + "-k3e6", ["stage 6 (the fixed last stage) has 2 blocks", "allowed depths: 1"]),
        (MBV2_1_0_TEXT.replace("k3e6-k3e6-k3e6_", "k3e6-k9e6-k3e6_", 1), ["stage 2, block 2", "kernel 9", "3, 5, 7"]),
        (MBV2_1_0_TEXT.replace("k3e6", "k3e2", 1), ["stage 1, block 1", "expand ratio 2", "3, 4, 6"]),
        (MBV2_1_0_TEXT.replace("k3e6", "3x6", 1), ["stage 1, block 1", "'3x6'", "k<kernel>e<expand ratio>"]),
    ],
)
def test_mobilenetv2_invalid_strings_name_position(text, fragments):
    with pytest.raises(InvalidArchitectureError) as error:
        get_space("mobilenetv2").parse(text)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_mobilenetv2_arch_rejects_non_integer_kernel():
    with pytest.raises(InvalidArchitectureError, match="kernel 3.0"):
        MobileNetV2Arch.uniform((2, 2, 2, 2, 2), kernel=3.0, expand=6)


@pytest.mark.parametrize(
    "space_name,text,fragments",
    [
        ("autoformer-tiny", AUTOFORMER_T_TEXT.replace("e192", "e200"), ["embedding dimension 200", "192, 216, 240"]),
        ("autoformer-tiny", AUTOFORMER_T_TEXT + "-h3m3.5-h3m3.5", ["15 layers", "allowed depths: 12, 13, 14"]),
        ("autoformer-tiny", AUTOFORMER_T_TEXT.replace("h4m3.5", "h5m3.5"), ["layer 11 has 5 heads", "allowed heads: 3, 4"]),
        ("autoformer-tiny", AUTOFORMER_T_TEXT.replace("h3m3.0", "h3m2.5", 1), ["layer 3 has MLP ratio 2.5", "3.0, 3.5, 4.0"]),
        ("autoformer-tiny", AUTOFORMER_T_TEXT.replace("h3m3.0", "h3x3.0", 1), ["layer 3", "h<heads>m<MLP ratio>"]),
        ("autoformer-tiny", "192_h3m3.5", ["e<embedding dim>_"]),
        ("autoformer-small", AUTOFORMER_T_TEXT, ["autoformer-small", "embedding dimension 192", "320, 384, 448"]),
    ],
)
def test_autoformer_invalid_strings_name_position(space_name, text, fragments):
    with pytest.raises(InvalidArchitectureError) as error:
        get_space(space_name).parse(text)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_autoformer_space_rejects_arch_of_other_space():
    small = get_space("autoformer-small")
    with pytest.raises(InvalidArchitectureError, match="autoformer-small"):
        small.params(AUTOFORMER_T)
    with pytest.raises(InvalidArchitectureError, match="expected an AutoFormerArch"):
        small.flops(MOBILENETV2_1_0)


@pytest.mark.parametrize(
    "factory,options,fragment",
    [
        ("mobilenetv2", {"input_size": 16}, "at least 32"),
        ("mobilenetv2", {"width_mult": 0.0}, "width_mult"),
        ("autoformer-tiny", {"input_size": 40}, "multiple of the patch size 16"),
        ("autoformer-base", {"num_classes": 0}, "num_classes"),
    ],
)
def test_space_options_are_checked(factory, options, fragment):
    with pytest.raises(InvalidArchitectureError, match=fragment):
        get_space(factory, **options)


def test_unknown_space_name_lists_new_spaces():
    with pytest.raises(UnknownNameError) as error:
        get_space("autoformer-huge")
    for name in ["mobilenetv2", "autoformer-tiny", "autoformer-small", "autoformer-base"]:
        assert name in str(error.value)
        assert name in list_spaces()


def test_enumerate_is_not_offered():
    for name in ["mobilenetv2"] + AUTOFORMER_SPACES:
        with pytest.raises(NotImplementedError):
            get_space(name).enumerate()


# --------------------------------------------------------------------------------------
# Sampling and mutation


@pytest.mark.parametrize("space_name", ["mobilenetv2"] + AUTOFORMER_SPACES)
def test_sample_follows_explicit_rng(space_name):
    space = get_space(space_name)
    first = [space.sample(random.Random(3)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = random.Random(3)
    distinct = {space.to_string(space.sample(rng)) for _ in range(20)}
    assert len(distinct) == 20


@pytest.mark.parametrize("space_name", ["mobilenetv2"] + AUTOFORMER_SPACES)
def test_mutate_follows_rng_and_changes_arch(space_name):
    space = get_space(space_name)
    parent = space.sample(random.Random(1))
    for seed in range(30):
        child = space.mutate(parent, random.Random(seed))
        assert child == space.mutate(parent, random.Random(seed))
        assert child != parent
        assert space.parse(space.to_string(child)) == child


def test_mobilenetv2_mutation_changes_one_choice():
    space = get_space("mobilenetv2")
    parent = MOBILENETV2_1_0
    for seed in range(40):
        child = space.mutate(parent, random.Random(seed))
        if child.depths != parent.depths:
            changed = [i for i, (a, b) in enumerate(zip(child.depths, parent.depths)) if a != b]
            assert len(changed) == 1
            shared = min(child.depths[changed[0]], parent.depths[changed[0]])
            assert child.stages[changed[0]][:shared] == parent.stages[changed[0]][:shared]
        else:
            differences = sum(
                (a[0] != b[0]) + (a[1] != b[1]) for a, b in zip(child.blocks, parent.blocks)
            )
            assert differences == 1


def test_autoformer_mutation_changes_one_choice():
    space = get_space("autoformer-tiny")
    parent = AUTOFORMER_T
    for seed in range(40):
        child = space.mutate(parent, random.Random(seed))
        if child.depth != parent.depth:
            shared = min(child.depth, parent.depth)
            assert child.embed_dim == parent.embed_dim
            assert child.layers[:shared] == parent.layers[:shared]
        else:
            differences = (child.embed_dim != parent.embed_dim) + sum(
                (a[0] != b[0]) + (a[1] != b[1]) for a, b in zip(child.layers, parent.layers)
            )
            assert differences == 1


def test_arch_values_are_hashable_and_immutable():
    assert len({MOBILENETV2_1_0, mobilenetv2.parse_arch(MBV2_1_0_TEXT)}) == 1
    assert AutoFormerArch(192, ((3, 3),) * 12) == AutoFormerArch(192, ((3, 3.0),) * 12)
    with pytest.raises(AttributeError):
        AUTOFORMER_T.embed_dim = 216  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Proxies on tiny networks

# Smaller settings for the costly proxies, so that each test stays short; only options a
# registered proxy declares are passed.
FAST_OPTIONS = {
    "tenas": {"ntk_batch_size": 4, "regions_batch_size": 8},
    "tenas_ntk": {"batch_size": 4},
    "tenas_regions": {"batch_size": 8},
    "fgnas_gc": {"iterations": 3, "gain_samples": 4},
    "fgnas_gi": {"iterations": 3, "gain_samples": 4},
}

# Pattern-based proxies (NASWOT, TE-NAS regions) read the sign at each GELU input on transformers.


def _fast_options(name):
    declared = get_proxy(name).default_options()
    return {key: value for key, value in FAST_OPTIONS.get(name, {}).items() if key in declared}


def _probe_batch(size):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, size, size, generator=generator), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("proxy", list_proxies())
def test_proxy_finite_on_tiny_mobilenetv2(proxy):
    space = get_space("mobilenetv2", **TINY_MBV2)
    inputs, labels = _probe_batch(32)
    result = score_architecture(space, MOBILENETV2_1_0, inputs, labels, [proxy], options={proxy: _fast_options(proxy)})[proxy]
    assert result.valid, result.reason
    assert math.isfinite(result.value)


@pytest.mark.parametrize("proxy", list_proxies())
def test_proxy_on_tiny_autoformer(proxy):
    space = get_space("autoformer-tiny", **TINY_AUTOFORMER)
    arch = space.smallest_arch()
    inputs, labels = _probe_batch(32)
    result = score_architecture(space, arch, inputs, labels, [proxy], options={proxy: _fast_options(proxy)})[proxy]
    assert result.valid, result.reason
    assert math.isfinite(result.value)
    if proxy == "tenas_regions":
        assert result.value > 0.0  # more than one activation pattern over the inputs


def test_proxies_differ_between_mobilenetv2_archs():
    space = get_space("mobilenetv2", **TINY_MBV2)
    inputs, labels = _probe_batch(32)
    names = [name for name in ("naswot", "params", "flops") if name in list_proxies()]
    small = score_architecture(space, mobilenetv2.smallest_arch(), inputs, labels, names)
    large = score_architecture(space, mobilenetv2.largest_arch(), inputs, labels, names)
    for name in names:
        assert small[name].value != large[name].value


@pytest.mark.parametrize("space_name", ["mobilenetv2"] + AUTOFORMER_SPACES)
def test_shrink_lowers_costs_until_smallest(space_name):
    space = get_space(space_name)
    rng = random.Random(2)
    arch = space.sample(rng)
    steps = 0
    while True:
        smaller = space.shrink(arch, rng)
        if smaller is None:
            break
        assert space.params(smaller) < space.params(arch)
        assert space.flops(smaller) < space.flops(arch)
        arch = smaller
        steps += 1
    assert steps > 0
    assert space.params(arch) == space.cost_range()["params"][0]
    assert space.flops(arch) == space.cost_range()["flops"][0]
