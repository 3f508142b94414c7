"""``small_resnet``: a small residual net for CPU runs from random init, a second architecture beside
``small_cnn``.

The evaluation's classifier must be an architecture outside the ensemble (the method paper's Table IV).
On CPU the ensemble is ``small_cnn``, and torchvision's architectures, with their stride-4 stems, stay
near chance at 48 to 64 pixels within a CPU budget (``docs/training.md``); this one learns there. Unlike
``small_cnn`` (plain conv-bn-relu blocks, max pools) it is residual and halves the resolution with
strided convolutions: a full-resolution stem, then three basic blocks (two 3x3 conv-bn, ReLU between,
a projected shortcut) of 64, 128 and 256 channels, each of stride 2. About 1.2 M parameters. It has
the zoo's shape (``features`` is the trunk), so it trains, convolutionalizes and crops like every
other member. There are no pretrained weights for it.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from pipeline.models.small_cnn import PooledNet

WIDTHS = (32, 64, 128, 256)  # stem, then one residual block per width


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv-bn-relu, conv-bn, plus a shortcut (1x1 conv-bn where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout))
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else nn.Sequential(*_conv_bn(cin, cout, stride, kernel=1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SmallResNet(PooledNet):
    """A 3x3 stem of 32 channels at full resolution, then residual blocks of 64, 128, 256 at stride 2."""

    name = "small_resnet"

    def __init__(self, num_classes: int = 1000, weights: None = None) -> None:
        stem = nn.Sequential(*_conv_bn(3, WIDTHS[0]), nn.ReLU(inplace=True))
        blocks = [BasicBlock(i, o, stride=2) for i, o in itertools.pairwise(WIDTHS)]
        super().__init__(nn.Sequential(stem, *blocks), WIDTHS[-1], num_classes, weights)
