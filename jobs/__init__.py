"""Ray job entrypoints (``python -m jobs.<name>``): thin wrappers over ``pipeline``."""
