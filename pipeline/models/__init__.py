"""Classifiers: the model zoo (torchvision architectures with replaceable heads) and their training."""
