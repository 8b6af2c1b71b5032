"""The standalone MobileNetV2-space network as PyTorch modules (imported lazily: it needs torch)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.spaces.mobilenetv2 import BlockPlan, MobileNetV2Config


class ReLU6(nn.ReLU):
    """min(max(x, 0), 6), the activation of MobileNetV2.

    It subclasses nn.ReLU because the activation-pattern proxies (NASWOT, TE-NAS linear
    regions) find rectifier units with `isinstance(module, nn.ReLU)`. A ReLU6 unit is
    active on the same side of zero as a ReLU unit. torch's own nn.ReLU6 derives from
    nn.Hardtanh, so those proxies would not see it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x, inplace=self.inplace)


def conv_bn(c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1, activation: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if activation:
        layers.append(ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expansion (left out at expand ratio 1), depthwise kxk, linear 1x1 projection; residual when shapes allow."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        hidden = plan.hidden_channels
        layers: List[nn.Module] = []
        if plan.expand_ratio != 1:
            layers.append(conv_bn(plan.in_channels, hidden, 1))
        layers.append(conv_bn(hidden, hidden, plan.kernel, stride=plan.stride, groups=hidden))
        layers.append(conv_bn(hidden, plan.out_channels, 1, activation=False))
        self.layers = nn.Sequential(*layers)
        self.has_residual = plan.has_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.has_residual else out


class MobileNetV2Network(nn.Module):
    """Stem, inverted-residual blocks, 1x1 head convolution, pooling, classifier.

    `blocks` are the feature taps, in order. Block l maps the output of block l-1 (the
    stem's output for the first) to its own.
    """

    def __init__(self, plans: Sequence[BlockPlan], config: MobileNetV2Config) -> None:
        super().__init__()
        self.config = config
        self.stem = conv_bn(3, config.stem_width, 3, stride=2)
        self.blocks = nn.ModuleList(InvertedResidual(plan) for plan in plans)
        self.head_conv = conv_bn(plans[-1].out_channels, config.head_width, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config.head_width, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He normal (fan-out) for convolutions, BatchNorm at identity, N(0, 0.01) for the classifier.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def feature_taps(self) -> List[Tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the feature map before pooling (after the 1x1 head convolution)."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head_conv(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
