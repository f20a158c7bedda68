"""ResNet-18/34/50/101 (He et al., CVPR 2016) in torchvision's ImageNet module layout.

The attribute names (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...) are the checkpoint
format: torchvision ImageNet files and torchreid / fast-reid ResNet state dicts load into them.

Stages: stage j is `layer{j}`; its feature map is the output of the last block *before* the block's final
ReLU (residual + identity), i.e. the pre-activation map that feature distillation (Heo et al., ICCV 2019)
compares. The last block of each stage returns that sum and the next stage applies the ReLU, so `layer{j}`
called as a module (and a forward hook on it) gives the pre-activation map. Widths: 64·e, 128·e, 256·e, 512·e
(e = 1 for Basic blocks, 4 for Bottlenecks); strides 4, 8, 16, and 16 (last_stride=1, the re-ID default) or 32.
Numerically the same network as torchvision's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdreid.models.heads import ReidModel
from kdreid.models.registry import register_model


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    expansion = 1
    # The last block of a stage returns its residual sum before the ReLU (the stage's feature map); the next
    # stage applies the ReLU. Set by ResNet; not part of the state dict.
    output_preactivation = False

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + identity
        return out if self.output_preactivation else self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4
    output_preactivation = False

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # Stride on the 3×3 conv ("ResNet v1.5"), as torchvision does; its weights assume it.
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        return out if self.output_preactivation else self.relu(out)


class ResNet(ReidModel):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int | list[int],
        *,
        base_width: int = 64,
        last_stride: int = 1,
        embedding_dim: int = 0,
        bnneck: bool = True,
        num_heads: int = 1,
    ):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.last_stride = last_stride
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base_width
        stage_channels = []
        for index, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, last_stride))):
            width = base_width * 2**index
            stage = [block(in_channels, width, stride)]
            in_channels = width * block.expansion
            stage += [block(in_channels, width) for _ in range(blocks - 1)]
            stage[-1].output_preactivation = True
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            stage_channels.append(in_channels)
        self.stage_channels = tuple(stage_channels)
        self._init_trunk()
        self._build_head(in_channels, num_classes, embedding_dim=embedding_dim, bnneck=bnneck, num_heads=num_heads)

    def _init_trunk(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stage_batchnorms(self):
        last_blocks = [stage[-1] for stage in (self.layer1, self.layer2, self.layer3, self.layer4)]
        return [block.bn3 if isinstance(block, Bottleneck) else block.bn2 for block in last_blocks]

    def forward_stages(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            pre = stage(x)  # (N, C_j, H_j, W_j), before the ReLU
            maps.append(pre)
            x = F.relu(pre)  # not in place: `pre` is kept as the stage map
        return maps, x


@register_model(
    "resnet18",
    imagenet=("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    imagenet_howto="torchvision.models.resnet18(weights='IMAGENET1K_V1')",
)
def resnet18(num_classes, **kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kwargs)


@register_model(
    "resnet34",
    imagenet=("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
    imagenet_howto="torchvision.models.resnet34(weights='IMAGENET1K_V1')",
)
def resnet34(num_classes, **kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, **kwargs)


@register_model(
    "resnet50",
    # torchvision's V1 file first (the one re-ID papers start from), then V2 and the pre-0.13 name.
    imagenet=("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", "resnet50-19c8e357.pth"),
    imagenet_howto="torchvision.models.resnet50(weights='IMAGENET1K_V1')",
)
def resnet50(num_classes, **kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kwargs)


@register_model(
    "resnet101",
    imagenet=("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth", "resnet101-5d3b4d8f.pth"),
    imagenet_howto="torchvision.models.resnet101(weights='IMAGENET1K_V1')",
)
def resnet101(num_classes, **kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, **kwargs)


@register_model("resnet_tiny", tiny=True)
def resnet_tiny(num_classes, **kwargs) -> ResNet:
    """ResNet-18's code path at 1/8 of its width and one block per stage: for tests."""
    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes, base_width=8, **kwargs)
