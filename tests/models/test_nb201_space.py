import csv
import random

import pytest
import torch

from models.errors import InvalidArchitectureError, UnknownNameError
from models.spaces import get_space, list_spaces
from models.spaces import nb201

GOLDEN = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def test_golden_architecture_index_params_flops():
    space = get_space("nb201")
    arch = space.parse(GOLDEN)
    assert arch.index == 13714
    assert space.params(arch) == 1_073_466
    assert round(space.flops(arch) / 1e6, 2) == 153.27


def test_string_round_trip():
    arch = nb201.parse_arch(GOLDEN)
    assert arch.to_string() == GOLDEN
    assert nb201.parse_arch("  " + GOLDEN + "\n") == arch


def test_enumeration_covers_space_in_index_order():
    archs = list(nb201.enumerate_archs())
    assert len(archs) == 15_625
    assert len(set(archs)) == 15_625
    assert [a.index for a in archs[:50]] == list(range(50))
    assert archs[13714].to_string() == GOLDEN


def test_enumeration_matches_benchmark_file(shared_data):
    with (shared_data / "nb201" / "hw_nasbench.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        assert nb201.arch_at_index(int(row["nb201_index"])).to_string() == row["arch"]


def test_params_equal_benchmark_for_every_dev_arch(shared_data):
    space = get_space("nb201")
    with (shared_data / "nb201" / "accuracy.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 11_625
    mismatches = [r["arch"] for r in rows if space.params(space.parse(r["arch"])) != round(float(r["params_M_cifar10"]) * 1e6)]
    assert mismatches == []


@pytest.mark.parametrize(
    "arch_text",
    [
        GOLDEN,
        "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
        "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    ],
)
@pytest.mark.parametrize("num_classes,input_size", [(10, 32), (120, 16)])
def test_analytic_counts_match_built_network(arch_text, num_classes, input_size):
    space = get_space("nb201", num_classes=num_classes, input_size=input_size)
    arch = space.parse(arch_text)
    network = space.build(arch)
    assert space.params(arch) == sum(p.numel() for p in network.parameters())
    assert space.flops(arch) == _count_macs(network, input_size)


def _count_macs(network, size):
    """Slow count: multiply-adds of every conv and linear layer, read from hooks on a real forward pass."""
    total = []

    def on_conv(module, args, output):
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total.append(output[0].numel() * kernel)

    def on_linear(module, args, output):
        total.append(module.in_features * module.out_features)

    handles = [
        m.register_forward_hook(on_conv if isinstance(m, torch.nn.Conv2d) else on_linear)
        for m in network.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        network.eval()(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return sum(total)


def test_disconnected_cells_are_marked():
    degenerate = [a for a in nb201.enumerate_archs() if not a.has_path()]
    assert len(degenerate) == 341
    space = get_space("nb201")
    arch = space.parse("|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|nor_conv_3x3~2|")
    assert space.is_degenerate(arch)
    network = space.build(arch).eval()
    with torch.no_grad():
        out_a = network(torch.randn(2, 3, 32, 32))
        out_b = network(torch.randn(2, 3, 32, 32))
    assert torch.equal(out_a, out_b)


def test_network_exposes_seventeen_taps():
    network = get_space("nb201").build(nb201.parse_arch(GOLDEN))
    taps = network.feature_taps()
    assert len(taps) == 17
    assert network(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_sample_and_mutate_follow_explicit_rng():
    first = [nb201.sample_arch(random.Random(3)) for _ in range(2)]
    assert first[0] == first[1]
    arch = nb201.parse_arch(GOLDEN)
    mutant = nb201.mutate_arch(arch, random.Random(1))
    assert sum(a != b for a, b in zip(arch.ops, mutant.ops)) == 1


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("|nor_conv_3x3~0|+|nor_conv_3x3~0|", "3 nodes"),
        ("|conv_5x5~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|", "conv_5x5"),
        ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~2|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|", "input 2 of node 2"),
        ("|nor_conv_3x3~0|+|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|", "node 2 needs 2 inputs"),
        ("", "3 nodes"),
    ],
)
def test_malformed_strings_name_the_position(text, fragment):
    with pytest.raises(InvalidArchitectureError, match=fragment):
        nb201.parse_arch(text)


def test_unknown_space_lists_known():
    with pytest.raises(UnknownNameError, match="nb201"):
        get_space("nb301")
    assert "nb201" in list_spaces()


def test_oversized_input_is_rejected():
    with pytest.raises(InvalidArchitectureError, match="input size 100000 is out of range"):
        get_space("nb201", input_size=100000)
