"""``small_cnn``: a four-block convolutional net for CPU runs from random init (demo, tests, laptops).

torchvision's architectures start with a stride-4 stem and carry millions of parameters; trained from
random init on a few hundred images at 32 to 64 pixels they stay near chance within a CPU budget of a
minute (``docs/training.md`` has the numbers). This net keeps full resolution in its first block and
halves it three times, so small objects and fine textures survive, and it has about 0.4 M parameters.
It has the zoo's shape (``features`` is the trunk, pooled globally, then a head), so it trains,
convolutionalizes and crops like every other member. There are no pretrained weights for it.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (32, 64, 128, 256)


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.MaxPool2d(2)] if pool else []
    layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class PooledNet(nn.Module):
    """Our CPU architectures' common shape, torchvision's: ``features`` (the trunk), global average
    pooling, a linear ``classifier``; convolutions He-initialized. No pretrained weights exist."""

    name = "pooled_net"

    def __init__(self, features: nn.Module, width: int, num_classes: int, weights: None = None) -> None:
        if weights is not None:  # the torchvision constructors' keyword, kept for a uniform call
            raise ValueError(f"{self.name} has no published weights")
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class SmallCNN(PooledNet):
    """Four blocks (2x2 max pool from the second on, then conv-bn-relu) of 32, 64, 128, 256 channels."""

    name = "small_cnn"

    def __init__(self, num_classes: int = 1000, weights: None = None) -> None:
        ins = (3, *WIDTHS[:-1])
        blocks = [_block(i, o, pool=n > 0) for n, (i, o) in enumerate(zip(ins, WIDTHS, strict=True))]
        super().__init__(nn.Sequential(*blocks), WIDTHS[-1], num_classes, weights)
