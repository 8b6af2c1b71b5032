"""NAS-Bench-201: the cell encoding, its 15,625 architectures, and the benchmark network.

A cell is a DAG on four nodes. Each of its six edges carries one of five operations,
written in the benchmark's canonical string, edges in the order e01 | e02 e12 | e03 e13 e23:

    |nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|

The network is the benchmark's own: a 3x3 conv stem with BatchNorm, three stages of five
identical cells at C, 2C and 4C channels, a residual reduction block between stages, and
BatchNorm-ReLU-global average pool-linear as the head.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from models.errors import InvalidArchitectureError

OPERATIONS: Tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")

# (target node, source node) of each edge, in the order of the canonical string.
EDGES: Tuple[Tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
NUM_EDGES = len(EDGES)
NUM_ARCHITECTURES = len(OPERATIONS) ** NUM_EDGES

_CONV_KERNEL = {"nor_conv_1x1": 1, "nor_conv_3x3": 3}


@dataclass(frozen=True)
class NB201Arch:
    """One cell: the operation on each edge, in canonical edge order."""

    ops: Tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ops) != NUM_EDGES:
            raise InvalidArchitectureError(
                f"a NAS-Bench-201 cell has {NUM_EDGES} edges, got {len(self.ops)} operations"
            )
        for position, op in enumerate(self.ops):
            if op not in OPERATIONS:
                target, source = EDGES[position]
                raise InvalidArchitectureError(
                    f"unknown operation {op!r} on edge {position + 1} (node {source} -> node {target}); "
                    f"expected one of {', '.join(OPERATIONS)}"
                )

    @classmethod
    def from_string(cls, text: str) -> "NB201Arch":
        return parse_arch(text)

    def to_string(self) -> str:
        nodes = []
        for target in (1, 2, 3):
            tokens = [f"{op}~{source}" for op, (t, source) in zip(self.ops, EDGES) if t == target]
            nodes.append("|" + "|".join(tokens) + "|")
        return "+".join(nodes)

    def __str__(self) -> str:
        return self.to_string()

    @property
    def code(self) -> str:
        """Six digits, the operation index of each edge (the order of the index file)."""
        return "".join(str(OPERATIONS.index(op)) for op in self.ops)

    @property
    def index(self) -> int:
        """Position in the benchmark's official index order (0..15624)."""
        return _index_of_code()[self.code]

    def op_count(self, op: str) -> int:
        return sum(1 for o in self.ops if o == op)

    def has_path(self) -> bool:
        """Return whether a path of non-`none` edges leads from the cell input to its output."""
        reachable = {0}
        for (target, source), op in sorted(zip(EDGES, self.ops), key=lambda item: item[0]):
            if op != "none" and source in reachable:
                reachable.add(target)
        return 3 in reachable


def parse_arch(text: str) -> NB201Arch:
    """Parse a canonical NAS-Bench-201 string, naming the position of the first mistake."""
    if not isinstance(text, str):
        raise InvalidArchitectureError(f"expected an architecture string, got {type(text).__name__}")
    stripped = text.strip()
    nodes = stripped.split("+")
    if len(nodes) != 3:
        raise InvalidArchitectureError(
            f"invalid NAS-Bench-201 architecture {stripped!r}: expected 3 nodes separated by '+', "
            f"found {len(nodes)}; example: |nor_conv_3x3~0|+|skip_connect~0|none~1|+|nor_conv_1x1~0|none~1|avg_pool_3x3~2|"
        )
    ops: List[str] = []
    for target, node in enumerate(nodes, start=1):
        if not (node.startswith("|") and node.endswith("|")) or len(node) < 2:
            raise InvalidArchitectureError(
                f"invalid NAS-Bench-201 architecture {stripped!r}: node {target} must be written as |op~source|...|"
            )
        tokens = node[1:-1].split("|")
        if len(tokens) != target:
            raise InvalidArchitectureError(
                f"invalid NAS-Bench-201 architecture {stripped!r}: node {target} needs {target} inputs, found {len(tokens)}"
            )
        for source, token in enumerate(tokens):
            op, sep, written_source = token.partition("~")
            if not sep or written_source != str(source):
                raise InvalidArchitectureError(
                    f"invalid NAS-Bench-201 architecture {stripped!r}: input {source + 1} of node {target} "
                    f"is {token!r}, expected OP~{source}"
                )
            if op not in OPERATIONS:
                raise InvalidArchitectureError(
                    f"invalid NAS-Bench-201 architecture {stripped!r}: unknown operation {op!r} "
                    f"on edge {source} -> {target}; expected one of {', '.join(OPERATIONS)}"
                )
            ops.append(op)
    # The string lists edges node by node, which is already the canonical edge order.
    return NB201Arch(tuple(ops))


@lru_cache(maxsize=1)
def _index_codes() -> Tuple[str, ...]:
    text = (Path(__file__).parent / "data" / "nb201_index_order.txt").read_text()
    codes = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(codes) != NUM_ARCHITECTURES:
        raise RuntimeError(f"the NAS-Bench-201 index file has {len(codes)} entries, expected {NUM_ARCHITECTURES}")
    return codes


@lru_cache(maxsize=1)
def _index_of_code() -> Dict[str, int]:
    return {code: index for index, code in enumerate(_index_codes())}


def arch_from_code(code: str) -> NB201Arch:
    return NB201Arch(tuple(OPERATIONS[int(digit)] for digit in code))


def arch_at_index(index: int) -> NB201Arch:
    if not 0 <= index < NUM_ARCHITECTURES:
        raise InvalidArchitectureError(f"NAS-Bench-201 index {index} is out of range 0..{NUM_ARCHITECTURES - 1}")
    return arch_from_code(_index_codes()[index])


def enumerate_archs() -> Iterator[NB201Arch]:
    """Yield all 15,625 cells in the benchmark's index order."""
    for code in _index_codes():
        yield arch_from_code(code)


def sample_arch(rng: random.Random) -> NB201Arch:
    return NB201Arch(tuple(rng.choice(OPERATIONS) for _ in range(NUM_EDGES)))


def mutate_arch(arch: NB201Arch, rng: random.Random) -> NB201Arch:
    """Change the operation on one edge, chosen uniformly, to a different operation."""
    position = rng.randrange(NUM_EDGES)
    choices = [op for op in OPERATIONS if op != arch.ops[position]]
    ops = list(arch.ops)
    ops[position] = rng.choice(choices)
    return NB201Arch(tuple(ops))


# --------------------------------------------------------------------------------------
# Analytic cost, in the benchmark's convention: every parameter (BatchNorm affine
# included), and FLOPs as the multiply-adds of convolutions and linear layers only.


@dataclass(frozen=True)
class NB201Config:
    """The fixed macro skeleton around the cell."""

    num_classes: int = 10
    input_size: int = 32
    channels: int = 16
    cells_per_stage: int = 5

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise InvalidArchitectureError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.input_size < 4 or self.input_size % 4:
            raise InvalidArchitectureError(
                f"input_size must be a positive multiple of 4 (32 for CIFAR, 16 for ImageNet16-120), got {self.input_size}"
            )

    @property
    def stage_channels(self) -> Tuple[int, int, int]:
        return (self.channels, 2 * self.channels, 4 * self.channels)

    @property
    def stage_sizes(self) -> Tuple[int, int, int]:
        return (self.input_size, self.input_size // 2, self.input_size // 4)


def _conv_bn_params(kernel: int, c_in: int, c_out: int) -> int:
    return kernel * kernel * c_in * c_out + 2 * c_out


def _reduction_params(c_in: int, c_out: int) -> int:
    return _conv_bn_params(3, c_in, c_out) + _conv_bn_params(3, c_out, c_out) + c_in * c_out


def _reduction_flops(c_in: int, c_out: int, out_size: int) -> int:
    pixels = out_size * out_size
    return pixels * (9 * c_in * c_out + 9 * c_out * c_out + c_in * c_out)


def count_params(arch: NB201Arch, config: NB201Config = NB201Config()) -> int:
    channels = config.stage_channels
    total = _conv_bn_params(3, 3, channels[0])
    for c in channels:
        per_cell = sum(_conv_bn_params(_CONV_KERNEL[op], c, c) for op in arch.ops if op in _CONV_KERNEL)
        total += config.cells_per_stage * per_cell
    total += _reduction_params(channels[0], channels[1]) + _reduction_params(channels[1], channels[2])
    total += 2 * channels[2]  # head BatchNorm
    total += channels[2] * config.num_classes + config.num_classes
    return total


def count_flops(arch: NB201Arch, config: NB201Config = NB201Config()) -> int:
    channels, sizes = config.stage_channels, config.stage_sizes
    total = sizes[0] * sizes[0] * 9 * 3 * channels[0]
    for c, size in zip(channels, sizes):
        per_cell = sum(_CONV_KERNEL[op] ** 2 * c * c for op in arch.ops if op in _CONV_KERNEL)
        total += config.cells_per_stage * size * size * per_cell
    total += _reduction_flops(channels[0], channels[1], sizes[1]) + _reduction_flops(channels[1], channels[2], sizes[2])
    total += channels[2] * config.num_classes
    return total


def cost_range(config: NB201Config = NB201Config()) -> Dict[str, Tuple[int, int]]:
    """Return the smallest and largest params and FLOPs over the space (all-`none` to all-3x3 cells)."""
    smallest = NB201Arch(("none",) * NUM_EDGES)
    largest = NB201Arch(("nor_conv_3x3",) * NUM_EDGES)
    return {
        "params": (count_params(smallest, config), count_params(largest, config)),
        "flops": (count_flops(smallest, config), count_flops(largest, config)),
    }


def build_network(arch: NB201Arch, config: NB201Config = NB201Config()):
    """Build the untrained benchmark network (PyTorch default initialisation)."""
    from models.spaces._nb201_net import NB201Network

    return NB201Network(arch, config)


def parse_many(lines: Sequence[str], source: str = "input") -> List[NB201Arch]:
    """Parse one architecture per non-empty line, naming the line of the first mistake."""
    archs: List[NB201Arch] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            archs.append(parse_arch(text))
        except InvalidArchitectureError as error:
            raise InvalidArchitectureError(f"{source}, line {number}: {error}") from None
    return archs


def index_or_none(arch: NB201Arch) -> Optional[int]:
    return _index_of_code().get(arch.code)
