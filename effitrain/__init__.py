"""effitrain: fast, dependable ImageNet training with PyTorch."""

__version__ = "0.1.0"
