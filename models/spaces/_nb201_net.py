"""The NAS-Bench-201 network as PyTorch modules (imported lazily: it needs torch)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from models.spaces.nb201 import EDGES, NB201Arch, NB201Config


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )


def _make_op(op: str, channels: int) -> nn.Module:
    if op == "skip_connect":
        return nn.Identity()
    if op == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if op == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if op == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"no module for operation {op!r}")


class NB201Cell(nn.Module):
    """The searched cell. `none` edges build no module: they add nothing to the sum."""

    def __init__(self, arch: NB201Arch, channels: int) -> None:
        super().__init__()
        self.edges = nn.ModuleDict()
        self._inputs: List[List[Tuple[str, int]]] = [[], [], [], []]
        for (target, source), op in zip(EDGES, arch.ops):
            if op == "none":
                continue
            key = f"{source}_{target}"
            self.edges[key] = _make_op(op, channels)
            self._inputs[target].append((key, source))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in (1, 2, 3):
            terms = [self.edges[key](nodes[source]) for key, source in self._inputs[target]]
            if not terms:
                nodes.append(torch.zeros_like(x))
                continue
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            nodes.append(total)
        return nodes[3]


class ResidualReduction(nn.Module):
    """The benchmark's residual block that halves the resolution and doubles the channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x)) + self.downsample(x)


class NB201Network(nn.Module):
    """Stem, 17 blocks (15 cells and 2 reductions), head.

    `blocks` are the feature taps, in order; block l maps the output of block l-1
    (the stem's output for the first) to its own.
    """

    def __init__(self, arch: NB201Arch, config: NB201Config) -> None:
        super().__init__()
        self.arch = arch
        self.config = config
        channels = config.stage_channels
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]))
        blocks: List[nn.Module] = []
        for stage, c in enumerate(channels):
            if stage > 0:
                blocks.append(ResidualReduction(channels[stage - 1], c))
            blocks.extend(NB201Cell(arch, c) for _ in range(config.cells_per_stage))
        self.blocks = nn.ModuleList(blocks)
        self.head_norm = nn.BatchNorm2d(channels[2])
        self.head_act = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels[2], config.num_classes)

    def feature_taps(self) -> List[Tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.head_act(self.head_norm(features))).flatten(1)
        return self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
