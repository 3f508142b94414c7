"""Convolutionalization (seed 000): a zoo classifier turned into a fully convolutional net.

The trunk computes what it did, its eval-mode batch norms folded into the convolutions before them
(for speed; a copy, so the classifier keeps its own). The global average pool becomes an average pool
with kernel D (the side of the trunk's feature map at the training input side W) and stride 1, and
every layer of the head becomes its per-location twin: a linear layer a 1x1 convolution with the same
weights, batch norm 1-d a batch norm 2-d with the same statistics, a layer norm over features a layer
norm over channels.
Dropout and activations stay. At input side W the net gives one cell, equal to the classifier's
output; on a larger image it gives a map of cells, each the classifier applied to one W x W window,
the windows ``stride`` pixels apart (``Geometry``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from pipeline.models.zoo import ARCHS, Classifier


@dataclass(frozen=True)
class Geometry:
    """Where a member's heatmap cells look, in the pixels of the image it was given."""

    window: int  # W: the side of the window one cell sees (the member's training input side)
    stride: int  # pixels between neighbouring cells
    pool: int  # D: the trunk's feature-map side at input W, the pooling kernel

    def centres(self, cells: int) -> np.ndarray:
        """Window centres along one axis, input pixels (pixel centres at integers).

        Cell i is the classifier applied to the W-pixel window that starts at ``stride * i`` (with its
        real surroundings as context), whatever the input's length: convolutions and pools map output
        index to input position independently of it, and what does not fill a last stride is dropped at
        the bottom and right. Aligning members by these centres, not by cell index, is what makes grids
        of different windows comparable.
        """
        return (self.window - 1) / 2 + self.stride * np.arange(cells, dtype=np.float64)


_FEATURE_OFFSETS: dict[tuple[str, int], float] = {}


def _positive_copy(trunk: nn.Module) -> nn.Module:
    """A copy of the trunk whose every output depends on every input of its receptive field, with
    positive weights: convolutions positive, batch norms identity, max pools averaged, and squeeze-and-
    excitation gates constant (their global pooling would otherwise reach the whole image)."""
    from torchvision.ops.misc import SqueezeExcitation

    probe = copy.deepcopy(trunk).float().cpu().eval()
    gen = torch.Generator().manual_seed(0)
    for module in list(probe.modules()):
        if isinstance(module, SqueezeExcitation):
            for p in module.parameters():
                p.data.zero_()
            continue
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.rand(module.weight.shape, generator=gen) / fan_in + 0.1 / fan_in
            if module.bias is not None:
                module.bias.data.zero_()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))  # fmt: skip
    return probe


def feature_offset(trunk: nn.Module, stride: int, height: int) -> float:
    """Centre of the receptive field of the trunk's feature cell 0, in input pixels: the support of one
    cell's gradient in a wide input (a positive-weight copy, so the support is the whole field). Exact,
    and independent of the weights; ``height`` is any input side the trunk accepts."""
    probe = _positive_copy(trunk)
    length = 8 * stride
    while True:
        x = torch.ones(1, 3, height, length, requires_grad=True)
        y = probe(x)
        middle = y.shape[-1] // 2
        (grad,) = torch.autograd.grad(y[0, :, :, middle].sum(), x)
        cols = torch.nonzero(grad.abs().sum(dim=(0, 1, 2)) > 0).flatten()
        lo, hi = int(cols.min()), int(cols.max())
        if (lo > 0 and hi < length - 1) or length >= 2**14:
            return (lo + hi) / 2 - stride * middle
        length *= 2


def feature_centres(model: Classifier, cells: int) -> np.ndarray:
    """Receptive-field centres of the trunk's feature cells along one axis, input pixels: where a
    saliency map's cell (Grad-CAM, SIMILARnet) was computed from. Measured once per trunk structure."""
    return feature_offset_of(model) + ARCHS[model.arch].stride * np.arange(cells, dtype=np.float64)


def feature_offset_of(model: Classifier) -> float:
    """Where the model's feature cell 0 is centred (``feature_offset``), cached per trunk structure (the
    key costs a walk of the trunk: callers that ask often keep the number)."""
    key = (model.arch, hash(repr(model.trunk)))
    if key not in _FEATURE_OFFSETS:
        stride = ARCHS[model.arch].stride
        try:  # a low input is cheaper; a trunk that cannot take it gets its training side
            _FEATURE_OFFSETS[key] = feature_offset(model.trunk, stride, ARCHS[model.arch].min_size)
        except RuntimeError:
            _FEATURE_OFFSETS[key] = feature_offset(model.trunk, stride, model.input_size)
    return _FEATURE_OFFSETS[key]


def _convolutional(layer: nn.Module) -> nn.Module:
    """A head layer's per-location twin, with the same parameters and statistics (and dtype)."""
    like = next(iter(layer.state_dict().values()), None)
    kind = {"dtype": like.dtype, "device": like.device} if like is not None else {}
    if isinstance(layer, nn.Linear):
        conv = nn.Conv2d(layer.in_features, layer.out_features, 1, bias=layer.bias is not None, **kind)
        with torch.no_grad():
            conv.weight.copy_(layer.weight[:, :, None, None])
            if layer.bias is not None:
                conv.bias.copy_(layer.bias)
        return conv
    if isinstance(layer, nn.BatchNorm1d):
        bn = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine,
                            layer.track_running_stats, **kind)  # fmt: skip
        bn.load_state_dict(layer.state_dict())
        return bn
    if isinstance(layer, nn.LayerNorm):  # over the features; per location, over the channels
        norm = LayerNorm2d(layer.normalized_shape, eps=layer.eps, elementwise_affine=layer.elementwise_affine,
                           **kind)  # fmt: skip
        norm.load_state_dict(layer.state_dict())
        return norm
    if isinstance(layer, nn.Dropout | nn.ReLU | nn.Identity):
        return copy.deepcopy(layer)
    raise TypeError(f"cannot convolutionalize a head layer of type {type(layer).__name__}")


def inference_trunk(trunk: nn.Module) -> nn.Module:
    """A copy of an eval-mode trunk with every batch norm folded into the convolution before it (one
    pass over the feature maps fewer; the same function up to rounding), and each convolution with the
    ReLU or ReLU6 after it made one ``OneDNNConv`` (below). torch.fx traces the trunk; one it cannot
    trace is returned as it is."""
    from torch.fx.experimental.optimization import fuse

    try:
        traced = fuse(copy.deepcopy(trunk).eval())
    except Exception:  # an untraceable trunk: unfused is still right
        return trunk
    return _onednn_convolutions(traced)


class OneDNNConv(nn.Module):
    """A convolution and the activation after it (none, ReLU, or a clamp such as ReLU6), run on the CPU
    as one oneDNN primitive (``mkldnn::_convolution_pointwise``, what torch.compile's CPU backend calls):
    the activation is applied as the output is written, and the primitive is used at every batch size.
    Plain ``conv2d`` on one thread sends 1x1 convolutions of fewer than 16 images to a slower im2col path
    (2x to 3x slower on the FCNs' feature maps, with a layout copy each way), and these make up most of a
    MobileNet-style trunk. Same arithmetic as oneDNN's unfused convolution (identical outputs on the
    tested trunks; within 2e-6 of the im2col path's probabilities). Elsewhere (GPU, float64, autograd)
    it is the convolution and the activation, as they were."""

    def __init__(self, conv: nn.Conv2d, activation: str = "none", bounds: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        self.conv, self.activation, self.bounds = conv, activation, bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled  # else: plain conv
        direct = x.device.type == "cpu" and x.dtype == torch.float32 and onednn
        if direct and not (torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad)):
            scalars = list(self.bounds) if self.activation == "hardtanh" else []
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
                self.activation, scalars, "",
            )  # fmt: skip
        y = c(x)
        if self.activation == "relu":
            return torch.relu(y)
        if self.activation == "hardtanh":
            return nn.functional.hardtanh(y, *self.bounds)
        return y


def _onednn_convolutions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Every plain (zero-padded, numerically padded) Conv2d of a traced trunk as a ``OneDNNConv``, taking
    in the ReLU or Hardtanh (ReLU6) module that is its only user."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        users = list(node.users)
        after = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if isinstance(after, nn.ReLU):
            fused = OneDNNConv(conv, "relu")
        elif isinstance(after, nn.Hardtanh):  # ReLU6 is a Hardtanh
            fused = OneDNNConv(conv, "hardtanh", (float(after.min_val), float(after.max_val)))
        else:
            fused, after = OneDNNConv(conv), None
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        if after is not None:
            users[0].replace_all_uses_with(node)
            gm.graph.erase_node(users[0])
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


class FCN(nn.Module):
    """A classifier as a fully convolutional net: (N, 3, H, W) images -> (N, classes, h, w) logits."""

    def __init__(self, model: Classifier, window: int | None = None) -> None:
        super().__init__()
        self.arch = model.arch
        window = window or model.input_size
        self.trunk = model.trunk
        self.head = nn.Sequential(*[_convolutional(layer) for layer in model.head])
        was_training = model.training
        model.eval()
        with torch.no_grad():
            probe = next(model.parameters())
            pool = self.trunk(torch.zeros(1, 3, window, window, dtype=probe.dtype, device=probe.device))
        model.train(was_training)
        self.geometry = Geometry(window=window, stride=ARCHS[model.arch].stride, pool=int(pool.shape[-1]))
        self.pool = nn.AvgPool2d(self.geometry.pool, stride=1)
        self.trunk = inference_trunk(self.trunk)
        # Channels-last: on CPU the pyramid's convolutions and max pools run about 1.4x to 1.8x faster
        # so (docs/benchmarks.md, the demo's stage times); on GPU it is the layout tensor cores want.
        self.to(memory_format=torch.channels_last)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.trunk(x.contiguous(memory_format=torch.channels_last))))

    def heatmap(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location class probabilities: a softmax over the channels of every cell (float32 at least)."""
        logits = self.forward(x)
        return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)


def convolutionalize(model: Classifier, window: int | None = None) -> FCN:
    """The fully convolutional twin of ``model``: its trunk (in eval mode, batch norms folded), its head
    as convolutions."""
    return FCN(model, window)
