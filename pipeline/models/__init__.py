"""Classifiers: the model zoo (torchvision architectures with replaceable heads) and their training."""


def is_weights_file(weights: str) -> bool:
    """A weights file (path or URI), as opposed to a torchvision weights name such as IMAGENET1K_V1."""
    return "/" in weights or weights.endswith((".pt", ".pth", ".ckpt"))


# Smallest training input side that still leaves a feature map (torchvision's models: 32).
MIN_INPUT_SIZE = {"inception_v3": 75, "small_cnn": 8, "small_resnet": 8}


def min_input_size(arch: str) -> int:
    return MIN_INPUT_SIZE.get(arch, 32)
