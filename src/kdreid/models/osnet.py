"""OSNet, the Omni-Scale Network (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification",
ICCV 2019).

Each block runs four streams of 1, 2, 3 and 4 lightweight 3×3 convolutions (1×1 conv then depthwise 3×3:
receptive fields of 3, 5, 7 and 9) from a 1×1 bottleneck, weighs each stream per channel with one shared
*unified aggregation gate* (global pooling → 1×1 → ReLU → 1×1 → sigmoid), sums them, expands back with a
linear 1×1 and adds the (projected) input. After the trunk come global pooling and a 512-d `fc`
(Linear + BN + ReLU), which is part of the architecture.

Module names follow torchreid's OSNet exactly (`conv1.conv`, `conv2.0.conv2b.1.conv2`, `conv2.2.0.conv`,
`conv5.bn`, `fc.0`, `fc.1`, ...), so the state dicts of its model zoo (ImageNet and re-ID) load unchanged.

Stages (4 maps): stage 1 = the blocks of `conv2` (output of its last block before the final ReLU, at stride
4, before the 1×1 + avg-pool transition), stage 2 = the blocks of `conv3` (stride 8), stage 3 = `conv4`
(stride 16), stage 4 = `conv5`'s BatchNorm output before its ReLU (stride 16). Widths: c1, c2, c3, c3 with
channels (c0, c1, c2, c3) = x1.0 (64, 256, 384, 512), x0.75 (48, 192, 288, 384), x0.5 (32, 128, 192, 256),
x0.25 (16, 64, 96, 128). At 256×128 the maps are 64×32, 32×16, 16×8, 16×8: the same sizes as a ResNet's
with last stride 1, so feature distillation between them needs no resizing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdreid.models.heads import ReidModel
from kdreid.models.registry import register_model


class ConvBN(nn.Module):
    """conv (no bias) + BatchNorm, then ReLU unless `relu=False` (then the output is linear)."""

    output_preactivation = False  # set on `conv5`, whose pre-ReLU output is stage 4's map

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding=0, groups=1, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.use_relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        return F.relu(out) if self.use_relu and not self.output_preactivation else out


class LightConv3x3(nn.Module):
    """1×1 conv (linear) then depthwise 3×3, BN, ReLU: a 3×3 receptive field at a fraction of the cost."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    """The unified aggregation gate: per-channel weights in (0, 1) computed from the stream's own content."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(weights))))
        return x * weights


class OSBlock(nn.Module):
    # The last block of a stage returns its residual sum before the ReLU (the stage's feature map).
    output_preactivation = False

    def __init__(self, in_channels: int, out_channels: int, bottleneck_reduction: int = 4):
        super().__init__()
        mid = out_channels // bottleneck_reduction
        self.conv1 = ConvBN(in_channels, mid)
        # Streams of 1..4 LightConv3x3 (receptive fields 3, 5, 7, 9); the names are torchreid's.
        self.conv2a = LightConv3x3(mid)
        self.conv2b = nn.Sequential(*(LightConv3x3(mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LightConv3x3(mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LightConv3x3(mid) for _ in range(4)))
        self.gate = ChannelGate(mid)  # one gate shared by the four streams
        self.conv3 = ConvBN(mid, out_channels, relu=False)
        self.downsample = ConvBN(in_channels, out_channels, relu=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        bottleneck = self.conv1(x)
        streams = (self.conv2a, self.conv2b, self.conv2c, self.conv2d)
        mixed = sum(self.gate(stream(bottleneck)) for stream in streams)
        out = self.conv3(mixed) + identity
        return out if self.output_preactivation else F.relu(out)


def _osnet_stage(in_channels: int, out_channels: int, blocks: int, reduce: bool) -> nn.Sequential:
    layers = [OSBlock(in_channels, out_channels)]
    layers += [OSBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    if reduce:  # transition: 1×1 conv + 2×2 average pooling halves the resolution
        layers.append(nn.Sequential(ConvBN(out_channels, out_channels), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)


class OSNet(ReidModel):
    def __init__(
        self,
        channels: tuple[int, int, int, int],
        num_classes: int | list[int],
        *,
        layers: tuple[int, int, int] = (2, 2, 2),
        fc_dim: int = 512,
        last_stride: int = 1,
        embedding_dim: int = 0,
        bnneck: bool = True,
        num_heads: int = 1,
    ):
        super().__init__()
        if last_stride != 1:
            # OSNet's last stage keeps the resolution by design (output stride 16); there is no stride to set.
            raise ValueError(f"OSNet has no last-stage stride to set (its maps stay at 1/16 of the input), got "
                             f"{last_stride}: leave --last-stride / --teacher-last-stride at 1")
        self.last_stride = 1
        c0, c1, c2, c3 = channels
        self.conv1 = ConvBN(3, c0, 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _osnet_stage(c0, c1, layers[0], reduce=True)
        self.conv3 = _osnet_stage(c1, c2, layers[1], reduce=True)
        self.conv4 = _osnet_stage(c2, c3, layers[2], reduce=False)
        self.conv5 = ConvBN(c3, c3)
        self.fc = nn.Sequential(nn.Linear(c3, fc_dim), nn.BatchNorm1d(fc_dim), nn.ReLU(inplace=True))
        for last_block in (self.conv2[-2], self.conv3[-2], self.conv4[-1], self.conv5):
            last_block.output_preactivation = True
        self.stage_channels = (c1, c2, c3, c3)
        self._init_trunk()
        self._build_head(fc_dim, num_classes, embedding_dim=embedding_dim, bnneck=bnneck, num_heads=num_heads)

    def _init_trunk(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def stage_batchnorms(self):
        return [self.conv2[-2].conv3.bn, self.conv3[-2].conv3.bn, self.conv4[-1].conv3.bn, self.conv5.bn]

    def forward_stages(self, x):
        x = self.maxpool(self.conv1(x))  # (N, c0, H/4, W/4)
        pre1 = self.conv2[:-1](x)  # (N, c1, H/4, W/4), before the last block's ReLU
        x = self.conv2[-1](F.relu(pre1))  # transition to H/8, W/8
        pre2 = self.conv3[:-1](x)  # (N, c2, H/8, W/8)
        x = self.conv3[-1](F.relu(pre2))  # transition to H/16, W/16
        pre3 = self.conv4(x)  # (N, c3, H/16, W/16)
        pre4 = self.conv5(F.relu(pre3))  # (N, c3, H/16, W/16), conv5's BN output before its ReLU
        return [pre1, pre2, pre3, pre4], F.relu(pre4)

    def pool(self, final_map):
        return self.fc(final_map.mean(dim=(2, 3)))  # (N, fc_dim)


# torchreid's model-zoo ImageNet files: it stores them as $TORCH_HOME/checkpoints/<name>_imagenet.pth.
_ZOO = "download <file> from torchreid's model zoo (https://kaiyangzhou.github.io/deep-person-reid/MODEL_ZOO)"
_OSNET_DIRS = ("hub/checkpoints", "checkpoints")


def _osnet_spec(name: str) -> dict:
    return dict(imagenet=(f"{name}_imagenet.pth",), imagenet_howto=_ZOO, torch_home_dirs=_OSNET_DIRS)


@register_model("osnet_x1_0", **_osnet_spec("osnet_x1_0"))
def osnet_x1_0(num_classes, **kwargs) -> OSNet:
    return OSNet((64, 256, 384, 512), num_classes, **kwargs)


@register_model("osnet_x0_75", **_osnet_spec("osnet_x0_75"))
def osnet_x0_75(num_classes, **kwargs) -> OSNet:
    return OSNet((48, 192, 288, 384), num_classes, **kwargs)


@register_model("osnet_x0_5", **_osnet_spec("osnet_x0_5"))
def osnet_x0_5(num_classes, **kwargs) -> OSNet:
    return OSNet((32, 128, 192, 256), num_classes, **kwargs)


@register_model("osnet_x0_25", **_osnet_spec("osnet_x0_25"))
def osnet_x0_25(num_classes, **kwargs) -> OSNet:
    return OSNet((16, 64, 96, 128), num_classes, **kwargs)


@register_model("osnet_tiny", tiny=True)
def osnet_tiny(num_classes, **kwargs) -> OSNet:
    """OSNet's code path with one block per stage and small widths (the gate needs mid ≥ 16): for tests."""
    return OSNet((16, 64, 64, 64), num_classes, layers=(1, 1, 1), fc_dim=32, **kwargs)
