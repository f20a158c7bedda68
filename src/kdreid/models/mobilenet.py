"""MobileNetV2 (Sandler et al., CVPR 2018) in torchvision's module layout (`features.N...`), so torchvision's
ImageNet file loads into `mobilenetv2_x1_0`.

Inverted residual blocks: 1×1 expansion (×t, ReLU6), depthwise 3×3 (ReLU6), linear 1×1 projection, with a
residual when the shape is kept. Widths scale by the width multiplier, rounded to multiples of 8; the last
1×1 conv has 1280 channels (1280 × multiplier above 1.0: 1792 for x1.4).

Stages: stage 1 ends at `features.3` (stride 4, 24·w channels), stage 2 at `features.6` (stride 8, 32·w),
stage 3 at `features.13` (stride 16, 96·w), stage 4 is `features.18` (the last 1×1 conv) before its ReLU6
(stride 16 with last_stride=1, else 32). Block outputs of MobileNetV2 are linear, so maps 1–3 are already
pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdreid.models.heads import ReidModel
from kdreid.models.registry import register_model

# (expansion t, channels c, blocks n, first stride s) of the paper's Table 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Index in `features` of the last block of stages 1-3, and of the first block of the stride-32 part.
_STAGE_ENDS = (3, 6, 13)
_LAST_STRIDED = 14


def _divisible(value: float, divisor: int = 8) -> int:
    """Round to a multiple of 8 without losing more than 10% (the rule the ImageNet weights were built with)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [] if expansion == 1 else [_conv_bn_relu6(in_channels, hidden)]
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(ReidModel):
    def __init__(
        self,
        width_mult: float,
        num_classes: int | list[int],
        *,
        last_channels: int | None = None,
        last_stride: int = 1,
        embedding_dim: int = 0,
        bnneck: bool = True,
        num_heads: int = 1,
    ):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.last_stride = last_stride
        in_channels = _divisible(32 * width_mult)
        features = [_conv_bn_relu6(3, in_channels, 3, stride=2)]
        for expansion, channels, blocks, stride in _SETTINGS:
            out_channels = _divisible(channels * width_mult)
            for index in range(blocks):
                block_stride = stride if index == 0 else 1
                if len(features) == _LAST_STRIDED:
                    block_stride = last_stride
                features.append(InvertedResidual(in_channels, out_channels, block_stride, expansion))
                in_channels = out_channels
        last_channels = last_channels or _divisible(1280 * max(1.0, width_mult))
        features.append(_conv_bn_relu6(in_channels, last_channels))
        self.features = nn.Sequential(*features)
        self.stage_channels = tuple(features[i].conv[-1].num_features for i in _STAGE_ENDS) + (last_channels,)
        self._init_trunk()
        self._build_head(last_channels, num_classes, embedding_dim=embedding_dim, bnneck=bnneck, num_heads=num_heads)

    def _init_trunk(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stage_batchnorms(self):
        return [self.features[i].conv[-1] for i in _STAGE_ENDS] + [self.features[-1][1]]

    def forward_stages(self, x):
        maps = []
        for index, layer in enumerate(self.features[:-1]):
            x = layer(x)
            if index in _STAGE_ENDS:
                maps.append(x)  # (N, C_j, H/4, W/4), (H/8, W/8), (H/16, W/16)
        last = self.features[-1]
        pre = last[1](last[0](x))  # last 1×1 conv + BN, before ReLU6
        maps.append(pre)
        return maps, F.relu6(pre)


@register_model(
    "mobilenetv2_x1_0",
    imagenet=("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
    imagenet_howto="torchvision.models.mobilenet_v2(weights='IMAGENET1K_V1')",
)
def mobilenetv2_x1_0(num_classes, **kwargs) -> MobileNetV2:
    return MobileNetV2(1.0, num_classes, **kwargs)


@register_model("mobilenetv2_x1_4")
def mobilenetv2_x1_4(num_classes, **kwargs) -> MobileNetV2:
    # torchvision publishes no width-1.4 ImageNet weights: pass a file in this layout as pretrained=PATH.
    return MobileNetV2(1.4, num_classes, **kwargs)


@register_model("mobilenetv2_tiny", tiny=True)
def mobilenetv2_tiny(num_classes, **kwargs) -> MobileNetV2:
    """MobileNetV2's code path at width 0.25 with a 64-channel last conv: for tests."""
    return MobileNetV2(0.25, num_classes, last_channels=64, **kwargs)
