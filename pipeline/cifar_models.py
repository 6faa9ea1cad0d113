"""The CIFAR ResNets and Wide ResNets of the distillation literature, as RepDistiller defines them.

- `resnet{8,14,20,32,44,56,110}`: He et al. 2016's CIFAR ResNets, depth 6n+2: a 16-channel 3x3 stem
  (stride 1), then three stages of n BasicBlocks at widths 16-32-64 (strides 1-2-2).
- `resnet8x4`, `resnet32x4`: the 4x wider variants of CRD (Tian et al. 2020): stem 32, stages 64-128-256.
- `wrn_{16,40}_{1,2}`: Zagoruyko & Komodakis 2016's pre-activation Wide ResNets, depth 6n+4,
  widths 16k-32k-64k.

As in RepDistiller (HobbitLong/RepDistiller, models/resnet.py and models/wrn.py): where a block changes
shape, the shortcut is a 1x1 conv (+ BN in the ResNets), not He et al.'s zero-padding option A. Parameter
names, construction order and initialisation match RepDistiller's, so its state dicts load here and a
seed gives the same initial weights. Two differences: the stem takes `in_channels` (RepDistiller: 3), and
the final pooling is global (RepDistiller: a fixed 8x8 window), so inputs other than 32x32 work too; at
32x32 the two are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        # Built before the convs (though registered after them), as RepDistiller does: same seed, same weights.
        shortcut = None
        if stride != 1 or c_in != c_out:
            shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.downsample = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem at widths[0], stages at widths[1:] of (depth - 2) / 6 blocks each."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], in_channels: int, num_classes: int):
        super().__init__()
        assert (depth - 2) % 6 == 0, f"depth must be 6n+2, got {depth}"
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride), *(BasicBlock(c_out, c_out) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBasicBlock(nn.Module):
    """Pre-activation block: conv(dropout(relu(bn(conv(relu(bn(x))))))) + shortcut, with a 1x1 conv
    shortcut (on the pre-activated input) where the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), _conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), _conv3x3(c_out, c_out)
        self.dropout = dropout
        # RepDistiller's name, kept so its state dicts load.
        self.convShortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.dropout(F.relu(self.bn2(self.conv1(pre))), p=self.dropout, training=self.training)
        return self.conv2(out) + (x if self.convShortcut is None else self.convShortcut(pre))


class WideStage(nn.Module):
    """A stage of WideBasicBlocks; a module of its own (RepDistiller's NetworkBlock) for its parameter names."""

    def __init__(self, blocks: int, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*(WideBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout)
                                     for i in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: 16-channel 3x3 stem, stages of (depth - 4) / 6 blocks at widths 16k-32k-64k, BN-ReLU, pool."""

    def __init__(self, depth: int, widen_factor: int, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, f"depth must be 6n+4, got {depth}"
        n, k = (depth - 4) // 6, widen_factor
        self.conv1 = _conv3x3(in_channels, 16)
        self.block1 = WideStage(n, 16, 16 * k, 1, dropout)
        self.block2 = WideStage(n, 16 * k, 32 * k, 2, dropout)
        self.block3 = WideStage(n, 32 * k, 64 * k, 2, dropout)
        self.bn1 = nn.BatchNorm2d(64 * k)
        self.fc = nn.Linear(64 * k, num_classes)
        for m in self.modules():  # He init, fan-out; written as RepDistiller writes it, for the same bits
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(depth: int, widths: tuple[int, int, int, int]):
    def build(in_channels: int, num_classes: int) -> CifarResNet:
        return CifarResNet(depth, widths, in_channels, num_classes)
    return build


def _wrn(depth: int, widen_factor: int):
    def build(in_channels: int, num_classes: int, dropout: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, in_channels, num_classes, dropout)
    return build


# name -> constructor (in_channels, num_classes, **options); merged into pipeline.models.ARCHITECTURES.
CIFAR_ARCHITECTURES = {
    **{f"resnet{depth}": _resnet(depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet(32, (32, 64, 128, 256)),
    **{f"wrn_{depth}_{k}": _wrn(depth, k) for depth, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
}
