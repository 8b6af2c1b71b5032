"""The MobileNetV2 search space (once-for-all / ProxylessNAS style): encoding, analytic cost, registration.

The network is MobileNetV2 (Sandler et al., CVPR 2018) with the widths and strides of the
reference network (torchvision's mobilenet_v2). Its seven inverted-residual stages, written
as (expand ratio t, output channels c, blocks n, stride s), are

    (1, 16, 1, 1) (6, 24, 2, 2) (6, 32, 3, 2) (6, 64, 4, 2) (6, 96, 3, 1) (6, 160, 3, 2) (6, 320, 1, 1)

and the space keeps the first stage fixed (one block, expand ratio 1, 3x3 depthwise kernel),
searches the depth of the five middle stages in {2, 3, 4}, and keeps the last stage (320
channels) at one block. Every block of the middle stages and the last block choose their
depthwise kernel in {3, 5, 7} and their expand ratio in {3, 4, 6}. MobileNetV2 1.0 is the
point with depths 2, 3, 4, 3, 3, kernel 3 and expand ratio 6 everywhere
(`MOBILENETV2_1_0`).

Canonical string: stages joined by '_', the blocks of a stage joined by '-', each block
written `k<kernel>e<expand ratio>`, the fixed first block left out. MobileNetV2 1.0 reads

    k3e6-k3e6_k3e6-k3e6-k3e6_k3e6-k3e6-k3e6-k3e6_k3e6-k3e6-k3e6_k3e6-k3e6-k3e6_k3e6

Fixed parts: a 3x3 stride-2 stem convolution, the first block, a 1x1 convolution to 1280
channels, global average pooling and a linear classifier. Every convolution is followed
by BatchNorm; ReLU6 follows all but the projection of each block. The width multiplier
scales every width (rounded to a multiple of 8 as MobileNetV2 does) except the
1280-channel convolution, which is only ever widened. Params count every parameter
(BatchNorm affine included). FLOPs are the multiply-adds of convolutions and the
linear layer, the convention of the 0.30 GFLOPS that torchvision lists for MobileNetV2 1.0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from models.errors import InvalidArchitectureError
from models.spaces._registry import SearchSpace, register_space

KERNEL_CHOICES: Tuple[int, ...] = (3, 5, 7)
EXPAND_CHOICES: Tuple[int, ...] = (3, 4, 6)
DEPTH_CHOICES: Tuple[int, ...] = (2, 3, 4)

STEM_WIDTH = 32
FIRST_BLOCK_WIDTH = 16
# Output width and stride of the first block of each searched stage, then of the fixed last stage.
STAGE_WIDTHS: Tuple[int, ...] = (24, 32, 64, 96, 160, 320)
STAGE_STRIDES: Tuple[int, ...] = (2, 2, 2, 1, 2, 1)
NUM_SEARCHED_STAGES = 5
NUM_STAGES = NUM_SEARCHED_STAGES + 1
LAST_STAGE_DEPTH = 1
HEAD_WIDTH = 1280

STAGE_SEPARATOR = "_"
BLOCK_SEPARATOR = "-"

Block = Tuple[int, int]  # (depthwise kernel, expand ratio)


def _stage_label(stage: int) -> str:
    """Name a stage by its 1-based position, as error messages show it."""
    if stage == NUM_STAGES - 1:
        return f"stage {stage + 1} (the fixed last stage)"
    return f"stage {stage + 1}"


def _allowed_depths(stage: int) -> Tuple[int, ...]:
    return (LAST_STAGE_DEPTH,) if stage == NUM_STAGES - 1 else DEPTH_CHOICES


@dataclass(frozen=True)
class MobileNetV2Arch:
    """The searched choices: for each of the six stages after the first block, its blocks as (kernel, expand ratio)."""

    stages: Tuple[Tuple[Block, ...], ...]

    def __post_init__(self) -> None:
        if len(self.stages) != NUM_STAGES:
            raise InvalidArchitectureError(
                f"a MobileNetV2 architecture has {NUM_STAGES} stages ({NUM_SEARCHED_STAGES} searched stages and "
                f"the fixed last stage), got {len(self.stages)}"
            )
        for stage, blocks in enumerate(self.stages):
            allowed = _allowed_depths(stage)
            if len(blocks) not in allowed:
                raise InvalidArchitectureError(
                    f"{_stage_label(stage)} has {len(blocks)} blocks; allowed depths: {_join(allowed)}"
                )
            for index, (kernel, expand) in enumerate(blocks):
                position = f"{_stage_label(stage)}, block {index + 1}"
                if not isinstance(kernel, int) or kernel not in KERNEL_CHOICES:
                    raise InvalidArchitectureError(
                        f"{position}: kernel {kernel} is not in the space; allowed kernels: {_join(KERNEL_CHOICES)}"
                    )
                if not isinstance(expand, int) or expand not in EXPAND_CHOICES:
                    raise InvalidArchitectureError(
                        f"{position}: expand ratio {expand} is not in the space; "
                        f"allowed expand ratios: {_join(EXPAND_CHOICES)}"
                    )

    @classmethod
    def uniform(cls, depths: Sequence[int], *, kernel: int, expand: int) -> "MobileNetV2Arch":
        """Build the architecture with the given searched-stage depths and one kernel and expand ratio everywhere."""
        if len(depths) != NUM_SEARCHED_STAGES:
            raise InvalidArchitectureError(
                f"expected {NUM_SEARCHED_STAGES} stage depths, got {len(depths)}: {list(depths)}"
            )
        all_depths = list(depths) + [LAST_STAGE_DEPTH]
        return cls(tuple(tuple((kernel, expand) for _ in range(depth)) for depth in all_depths))

    @property
    def depths(self) -> Tuple[int, ...]:
        """Block count of each searched stage (the last stage always has one)."""
        return tuple(len(blocks) for blocks in self.stages[:NUM_SEARCHED_STAGES])

    @property
    def blocks(self) -> Tuple[Block, ...]:
        """Every searched block in network order."""
        return tuple(block for blocks in self.stages for block in blocks)

    def to_string(self) -> str:
        return STAGE_SEPARATOR.join(
            BLOCK_SEPARATOR.join(f"k{kernel}e{expand}" for kernel, expand in blocks) for blocks in self.stages
        )

    def __str__(self) -> str:
        return self.to_string()


MOBILENETV2_1_0 = MobileNetV2Arch.uniform((2, 3, 4, 3, 3), kernel=3, expand=6)

_EXAMPLE = MOBILENETV2_1_0.to_string()


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(value) for value in values)


def _parse_block(token: str, stage: int, index: int) -> Block:
    """Read `k<kernel>e<expand>`. MobileNetV2Arch checks the values themselves."""
    kernel_text, separator, expand_text = token[1:].partition("e")
    if not token.startswith("k") or not separator or not kernel_text.isdigit() or not expand_text.isdigit():
        raise InvalidArchitectureError(
            f"{_stage_label(stage)}, block {index + 1}: {token!r} is not written as k<kernel>e<expand ratio>, e.g. k3e6"
        )
    return int(kernel_text), int(expand_text)


def parse_arch(text: str) -> MobileNetV2Arch:
    """Parse a canonical MobileNetV2-space string, naming the position of the first mistake."""
    if not isinstance(text, str):
        raise InvalidArchitectureError(f"expected a MobileNetV2 architecture string, got {type(text).__name__}")
    stripped = text.strip()
    stage_texts = stripped.split(STAGE_SEPARATOR)
    try:
        if len(stage_texts) != NUM_STAGES:
            raise InvalidArchitectureError(
                f"expected {NUM_STAGES} stages separated by {STAGE_SEPARATOR!r} ({NUM_SEARCHED_STAGES} searched "
                f"stages and the fixed last stage), found {len(stage_texts)}"
            )
        stages = []
        for stage, stage_text in enumerate(stage_texts):
            tokens = stage_text.split(BLOCK_SEPARATOR)
            stages.append(tuple(_parse_block(token, stage, index) for index, token in enumerate(tokens)))
        return MobileNetV2Arch(tuple(stages))
    except InvalidArchitectureError as error:
        raise InvalidArchitectureError(
            f"invalid MobileNetV2 architecture {stripped!r}: {error}; example: {_EXAMPLE}"
        ) from None


def sample_arch(rng: random.Random) -> MobileNetV2Arch:
    """Draw each stage depth, then each block's kernel and expand ratio, uniformly and independently."""
    stages = []
    for stage in range(NUM_STAGES):
        depth = rng.choice(_allowed_depths(stage))
        stages.append(tuple((rng.choice(KERNEL_CHOICES), rng.choice(EXPAND_CHOICES)) for _ in range(depth)))
    return MobileNetV2Arch(tuple(stages))


def mutate_arch(arch: MobileNetV2Arch, rng: random.Random) -> MobileNetV2Arch:
    """Change one choice, drawn uniformly from every stage depth, block kernel and block expand ratio.

    The new value differs from the old one. A deeper stage gets new trailing blocks with
    random choices. A shallower stage drops its trailing blocks.
    """
    genes: List[Tuple[str, int, int]] = [("depth", stage, -1) for stage in range(NUM_SEARCHED_STAGES)]
    for stage, blocks in enumerate(arch.stages):
        for index in range(len(blocks)):
            genes.append(("kernel", stage, index))
            genes.append(("expand", stage, index))
    kind, stage, index = rng.choice(genes)
    stages = [list(blocks) for blocks in arch.stages]
    if kind == "depth":
        depth = rng.choice([d for d in DEPTH_CHOICES if d != len(stages[stage])])
        while len(stages[stage]) < depth:
            stages[stage].append((rng.choice(KERNEL_CHOICES), rng.choice(EXPAND_CHOICES)))
        del stages[stage][depth:]
    else:
        kernel, expand = stages[stage][index]
        if kind == "kernel":
            kernel = rng.choice([k for k in KERNEL_CHOICES if k != kernel])
        else:
            expand = rng.choice([e for e in EXPAND_CHOICES if e != expand])
        stages[stage][index] = (kernel, expand)
    return MobileNetV2Arch(tuple(tuple(blocks) for blocks in stages))


def _lower(choices: Sequence[int], value: int) -> int:
    return choices[choices.index(value) - 1]


def shrink_arch(arch: MobileNetV2Arch, rng: random.Random) -> Optional[MobileNetV2Arch]:
    """Lower one choice by one step: a stage depth, a block kernel or a block expand ratio, drawn uniformly.

    Every step removes weights and multiply-adds, so repeated shrinking reaches the
    smallest architecture. Returns None when `arch` already is the smallest.
    """
    genes: List[Tuple[str, int, int]] = []
    for stage, blocks in enumerate(arch.stages):
        if stage < NUM_SEARCHED_STAGES and len(blocks) > min(DEPTH_CHOICES):
            genes.append(("depth", stage, -1))
        for index, (kernel, expand) in enumerate(blocks):
            if kernel > min(KERNEL_CHOICES):
                genes.append(("kernel", stage, index))
            if expand > min(EXPAND_CHOICES):
                genes.append(("expand", stage, index))
    if not genes:
        return None
    kind, stage, index = rng.choice(genes)
    stages = [list(blocks) for blocks in arch.stages]
    if kind == "depth":
        stages[stage].pop()
    else:
        kernel, expand = stages[stage][index]
        if kind == "kernel":
            kernel = _lower(KERNEL_CHOICES, kernel)
        else:
            expand = _lower(EXPAND_CHOICES, expand)
        stages[stage][index] = (kernel, expand)
    return MobileNetV2Arch(tuple(tuple(blocks) for blocks in stages))


# --------------------------------------------------------------------------------------
# The macro skeleton and the analytic cost.


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a width to the nearest multiple of `divisor`, never below `divisor` nor more than 10% below `value`.

    Width 1.0 keeps the reference widths, which are multiples of 8 already.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class MobileNetV2Config:
    """Fixed settings around the searched blocks: width multiplier, input resolution, classes."""

    width_mult: float = 1.0
    input_size: int = 224
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if not self.width_mult > 0:
            raise InvalidArchitectureError(f"width_mult must be positive, got {self.width_mult}")
        if self.input_size < 32:
            raise InvalidArchitectureError(
                f"input_size must be at least 32 pixels (the network's total stride is 32), got {self.input_size}"
            )
        if self.num_classes < 1:
            raise InvalidArchitectureError(f"num_classes must be at least 1, got {self.num_classes}")

    @property
    def stem_width(self) -> int:
        return make_divisible(STEM_WIDTH * self.width_mult)

    @property
    def first_block_width(self) -> int:
        return make_divisible(FIRST_BLOCK_WIDTH * self.width_mult)

    @property
    def stage_widths(self) -> Tuple[int, ...]:
        return tuple(make_divisible(width * self.width_mult) for width in STAGE_WIDTHS)

    @property
    def head_width(self) -> int:
        return make_divisible(HEAD_WIDTH * max(1.0, self.width_mult))


@dataclass(frozen=True)
class BlockPlan:
    """One inverted-residual block as built: widths, kernel, stride and the input and output resolution."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel: int
    stride: int
    in_size: int
    out_size: int

    @property
    def hidden_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _downsampled(size: int, stride: int) -> int:
    # An odd kernel k with padding k // 2 maps n pixels to ceil(n / stride).
    return (size - 1) // stride + 1


def plan_blocks(arch: MobileNetV2Arch, config: MobileNetV2Config) -> List[BlockPlan]:
    """Lay out every block, the fixed first block included, in network order."""
    size = _downsampled(config.input_size, 2)
    plans = [BlockPlan(config.stem_width, config.first_block_width, 1, 3, 1, size, size)]
    channels = config.first_block_width
    for blocks, width, stride in zip(arch.stages, config.stage_widths, STAGE_STRIDES):
        for index, (kernel, expand) in enumerate(blocks):
            block_stride = stride if index == 0 else 1
            out_size = _downsampled(size, block_stride)
            plans.append(BlockPlan(channels, width, expand, kernel, block_stride, size, out_size))
            channels, size = width, out_size
    return plans


def _conv_bn_params(weights: int, channels: int) -> int:
    return weights + 2 * channels


def _block_params(plan: BlockPlan) -> int:
    hidden = plan.hidden_channels
    total = 0
    if plan.expand_ratio != 1:
        total += _conv_bn_params(plan.in_channels * hidden, hidden)
    total += _conv_bn_params(plan.kernel * plan.kernel * hidden, hidden)
    total += _conv_bn_params(hidden * plan.out_channels, plan.out_channels)
    return total


def _block_flops(plan: BlockPlan) -> int:
    hidden = plan.hidden_channels
    total = 0
    if plan.expand_ratio != 1:
        total += plan.in_size * plan.in_size * plan.in_channels * hidden
    total += plan.out_size * plan.out_size * plan.kernel * plan.kernel * hidden
    total += plan.out_size * plan.out_size * hidden * plan.out_channels
    return total


def count_params(arch: MobileNetV2Arch, config: MobileNetV2Config = MobileNetV2Config()) -> int:
    plans = plan_blocks(arch, config)
    total = _conv_bn_params(3 * 3 * 3 * config.stem_width, config.stem_width)
    total += sum(_block_params(plan) for plan in plans)
    total += _conv_bn_params(plans[-1].out_channels * config.head_width, config.head_width)
    total += config.head_width * config.num_classes + config.num_classes
    return total


def count_flops(arch: MobileNetV2Arch, config: MobileNetV2Config = MobileNetV2Config()) -> int:
    plans = plan_blocks(arch, config)
    stem_size = plans[0].in_size
    total = stem_size * stem_size * 3 * 3 * 3 * config.stem_width
    total += sum(_block_flops(plan) for plan in plans)
    last = plans[-1]
    total += last.out_size * last.out_size * last.out_channels * config.head_width
    total += config.head_width * config.num_classes
    return total


def smallest_arch() -> MobileNetV2Arch:
    return MobileNetV2Arch.uniform((min(DEPTH_CHOICES),) * NUM_SEARCHED_STAGES, kernel=min(KERNEL_CHOICES), expand=min(EXPAND_CHOICES))


def largest_arch() -> MobileNetV2Arch:
    return MobileNetV2Arch.uniform((max(DEPTH_CHOICES),) * NUM_SEARCHED_STAGES, kernel=max(KERNEL_CHOICES), expand=max(EXPAND_CHOICES))


def build_network(arch: MobileNetV2Arch, config: MobileNetV2Config = MobileNetV2Config()):
    """Build the standalone untrained network (imported lazily: it needs torch)."""
    from models.spaces._mobilenetv2_net import MobileNetV2Network

    return MobileNetV2Network(plan_blocks(arch, config), config)


class MobileNetV2Space(SearchSpace):
    name = "mobilenetv2"

    def __init__(self, *, num_classes: int = 1000, input_size: int = 224, width_mult: float = 1.0) -> None:
        self.config = MobileNetV2Config(width_mult=width_mult, input_size=input_size, num_classes=num_classes)
        self.num_classes = num_classes
        self.input_size = input_size
        self.width_mult = width_mult

    def parse(self, text: str) -> MobileNetV2Arch:
        return parse_arch(text)

    def validate(self, arch: Any) -> MobileNetV2Arch:
        """Return `arch` when it is an architecture of this space; raise InvalidArchitectureError otherwise."""
        if isinstance(arch, str):
            return parse_arch(arch)
        if not isinstance(arch, MobileNetV2Arch):
            raise InvalidArchitectureError(f"expected a MobileNetV2Arch, got {type(arch).__name__}")
        return arch  # its constructor checked every value

    def to_string(self, arch: MobileNetV2Arch) -> str:
        return self.validate(arch).to_string()

    def sample(self, rng: random.Random) -> MobileNetV2Arch:
        return sample_arch(rng)

    def mutate(self, arch: MobileNetV2Arch, rng: random.Random) -> MobileNetV2Arch:
        return mutate_arch(self.validate(arch), rng)

    def shrink(self, arch: MobileNetV2Arch, rng: random.Random) -> Optional[MobileNetV2Arch]:
        """Lower one choice by one step (see `shrink_arch`). Returns None for the smallest architecture."""
        return shrink_arch(self.validate(arch), rng)

    def params(self, arch: MobileNetV2Arch) -> int:
        return count_params(self.validate(arch), self.config)

    def flops(self, arch: MobileNetV2Arch) -> int:
        return count_flops(self.validate(arch), self.config)

    def build(self, arch: MobileNetV2Arch):
        return build_network(self.validate(arch), self.config)

    def cost_range(self) -> Dict[str, Tuple[int, int]]:
        """Return the smallest and largest params and FLOPs, reached at the uniform corner points.

        Every cost grows with depth, kernel and expand ratio.
        """
        smallest, largest = smallest_arch(), largest_arch()
        return {
            "params": (count_params(smallest, self.config), count_params(largest, self.config)),
            "flops": (count_flops(smallest, self.config), count_flops(largest, self.config)),
        }

    def describe(self) -> Dict[str, Any]:
        description = super().describe()
        description.update(
            {
                "width_mult": self.width_mult,
                "depth_choices": list(DEPTH_CHOICES),
                "kernel_choices": list(KERNEL_CHOICES),
                "expand_choices": list(EXPAND_CHOICES),
                "flops_convention": "multiply-adds of convolutions and linear layers",
            }
        )
        return description


@register_space("mobilenetv2")
def _make_mobilenetv2(*, num_classes: int = 1000, input_size: int = 224, width_mult: float = 1.0) -> MobileNetV2Space:
    return MobileNetV2Space(num_classes=num_classes, input_size=input_size, width_mult=width_mult)
