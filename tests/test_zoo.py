"""Model zoo: every architecture builds with a replaceable head, its trunk is the torchvision network's
feature extractor (same outputs), parameters split into trunk and head, weights load from files."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from pipeline.models.small_cnn import SmallCNN
from pipeline.models.zoo import ARCHS, ModelError, build_model, head_parameters, trunk_parameters

# The original torchvision head applied to the pooled trunk features (VGG's flattens a 7x7 map: none).
ORIGINAL_HEAD = {
    "resnet18": lambda m, f: m.fc(f),
    "resnet50": lambda m, f: m.fc(f),
    "mobilenet_v3_small": lambda m, f: m.classifier(f),
    "mobilenet_v3_large": lambda m, f: m.classifier(f),
    "efficientnet_b0": lambda m, f: m.classifier(f),
    "densenet121": lambda m, f: m.classifier(f),
    "inception_v3": lambda m, f: m.fc(f),
    "regnet_y_400mf": lambda m, f: m.fc(f),
    "convnext_tiny": lambda m, f: m.classifier(f[:, :, None, None]),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_each_architecture_builds_and_its_trunk_matches_torchvision(arch):
    torch.manual_seed(0)
    size = ARCHS[arch].min_size * 2 if arch != "inception_v3" else 80
    model = build_model(arch, classes=7, head="linear", input_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert model.trunk(x).shape[1] == ARCHS[arch].features
    if arch in ORIGINAL_HEAD:  # rebuild the torchvision model around our trunk: same network, same output
        torch.manual_seed(0)
        extra = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
        tv = getattr(tvm, arch)(weights=None, **extra).eval()
        ours = build_model(arch, classes=7)
        ours.trunk.load_state_dict(ARCHS[arch].trunk(tv).state_dict())
        with torch.no_grad():
            pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(ours.eval().trunk(x), 1), 1)
            torch.testing.assert_close(ORIGINAL_HEAD[arch](tv, pooled), tv(x), atol=1e-4, rtol=1e-4)


def test_heads_and_parameter_groups():
    model = build_model("resnet18", classes=5, head="mlp")
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [1024, 512, 5]
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.head)
    head, trunk = {id(p) for p in head_parameters(model)}, {id(p) for p in trunk_parameters(model)}
    assert head and trunk and not head & trunk
    assert head | trunk == {id(p) for p in model.parameters()}
    convnext = build_model("convnext_tiny", classes=3)
    assert isinstance(convnext.head[0], nn.LayerNorm)  # its pretrained norm travels with the head


def test_errors_name_the_allowed_values(tmp_path):
    with pytest.raises(ModelError, match="allowed: resnet18"):
        build_model("resnet19", 3)
    with pytest.raises(ModelError, match="allowed: linear, mlp"):
        build_model("resnet18", 3, head="deep")
    with pytest.raises(ModelError, match="below its minimum 75"):
        build_model("inception_v3", 3, input_size=64)
    with pytest.raises(ModelError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        build_model("resnet18", 3, weights="IMAGENET9K")
    with pytest.raises(ModelError, match="weights file not found"):
        build_model("resnet18", 3, weights=str(tmp_path / "none.pth"))
    with pytest.raises(ModelError, match="small_cnn has no published weights"):
        build_model("small_cnn", 3, weights="DEFAULT")


def test_small_cnn_keeps_resolution_and_loads_its_own_weights_file(tmp_path):
    model = build_model("small_cnn", classes=5, input_size=48)
    assert model.trunk(torch.zeros(1, 3, 48, 48)).shape == (1, 256, 6, 6)  # three halvings, no stride-4 stem
    assert len(list(model.trunk.children())) == 4  # four blocks to unfreeze from the top
    assert sum(p.numel() for p in model.parameters()) < 500_000
    own = SmallCNN(num_classes=5)  # a file holds the plain net's state dict, as for torchvision's models
    torch.save(own.state_dict(), tmp_path / "cnn.pt")
    again = build_model("small_cnn", classes=5, weights=str(tmp_path / "cnn.pt"))
    torch.testing.assert_close(again.trunk[0][0].weight, own.features[0][0].weight)


def test_weights_from_a_state_dict_file(tmp_path):
    torch.manual_seed(1)
    tv = tvm.resnet18(weights=None, num_classes=101)  # a checkpoint fine-tuned elsewhere: another head
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", classes=4, weights=str(path))
    torch.testing.assert_close(model.trunk[0].weight, tv.conv1.weight)
    torch.save({"model": tvm.mobilenet_v3_small(weights=None).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="does not hold resnet18 weights"):
        build_model("resnet18", classes=4, weights=str(tmp_path / "other.pth"))


def test_download_failure_says_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached; this machine has no route out

    def offline(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ModelError, match="Offline\\? Pass a weights file"):
        build_model("resnet18", classes=3, weights="DEFAULT")
