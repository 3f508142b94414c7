"""Convolutionalization: at the training size the FCN is the classifier; on larger inputs its cells are
``stride`` pixels apart, for every zoo architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.crop.fcn import Geometry, convolutionalize, feature_centres
from pipeline.models.zoo import ARCHS, build_model

# A training side per architecture, small enough for a quick float64 pass on CPU.
SIDE = {"inception_v3": 96, "small_cnn": 48}
CASES = [(arch, "linear") for arch in sorted(ARCHS)] + [("resnet18", "mlp"), ("convnext_tiny", "mlp")]


def trained_looking(model: nn.Module) -> nn.Module:
    """Random batch-norm statistics and affine terms, as training leaves them: a conversion that
    dropped or misplaced a norm would then change the output."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=gen) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize(("arch", "head"), CASES)
def test_fcn_at_the_training_size_is_the_classifier(arch, head):
    torch.manual_seed(0)
    side = SIDE.get(arch, 64)
    model = trained_looking(build_model(arch, classes=6, head=head, input_size=side)).double().eval()
    fcn = convolutionalize(model)
    # Every batch norm after a convolution is folded into it (densenet121's pre-activation norms follow
    # none); the classifier keeps its own.
    norms = [sum(isinstance(m, nn.BatchNorm2d) for m in t.modules()) for t in (model.trunk, fcn.trunk)]
    before, after = norms
    assert after == 0 or (arch == "densenet121" and after < before), (before, after)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
        heat = fcn.heatmap(x)
        assert heat.shape == (2, 6, 1, 1) and heat.dtype == torch.float64
        assert (heat[:, :, 0, 0] - expected).abs().max() < 1e-5

        # Two strides more input: three windows a stride apart along each axis.
        big = fcn.heatmap(torch.randn(1, 3, side + 2 * fcn.geometry.stride, side + 2 * fcn.geometry.stride,
                                      dtype=torch.float64))  # fmt: skip
    assert big.shape == (1, 6, 3, 3)
    assert torch.allclose(big.sum(dim=1), torch.ones(1, 3, 3, dtype=torch.float64))


def test_window_centres_sit_a_stride_apart_from_the_first_window():
    g = Geometry(window=224, stride=32, pool=7)
    assert g.centres(3).tolist() == [111.5, 143.5, 175.5]


@pytest.mark.parametrize(("arch", "expected"), [("small_cnn", 3.5), ("resnet18", 0.0), ("vgg16_bn", 15.5),
                                               ("efficientnet_lite0", 0.0)])  # fmt: skip
def test_feature_cells_are_centred_where_the_paddings_put_them(arch, expected):
    """Saliency maps live on the trunk's feature cells. small_cnn and VGG pool in pairs (cell 0 centred
    on its 8 or 32 pixels); ResNet's and EfficientNet-Lite0's symmetrically padded stride-2 layers centre
    cell j on pixel 32 j."""
    model = build_model(arch, classes=3, input_size=SIDE.get(arch, 64))
    assert feature_centres(model, 3).tolist() == [expected + ARCHS[arch].stride * i for i in range(3)]
