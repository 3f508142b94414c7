"""Classifiers: the model zoo (torchvision architectures with replaceable heads) and their training."""


def is_weights_file(weights: str) -> bool:
    """A weights file (path or URI), as opposed to a torchvision weights name such as IMAGENET1K_V1."""
    return "/" in weights or weights.endswith((".pt", ".pth", ".ckpt"))
