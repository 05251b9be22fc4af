"""The model factory: any torchvision classification model by name, randomly initialised."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torchvision

from .config import ConfigError


@functools.cache
def available_models() -> list[str]:
    """Names of torchvision's classification models (resnet50, vit_b_16, ...)."""
    return torchvision.models.list_models(module=torchvision.models)


def create_model(arch: str, num_classes: int, zero_init_residual: bool = False,
                 kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build ``arch`` with random weights and a ``num_classes``-way head.

    ``zero_init_residual`` zero-initialises the last BN of each residual block, so every
    block starts as the identity (Goyal et al., 2017); torchvision supports it for the
    ResNet family. ``kwargs`` go to the builder as they are (e.g. ``dropout``).
    """
    if arch not in available_models():
        raise ConfigError(f"model.arch: unknown torchvision classification model {arch!r}")
    extra = dict(kwargs or {})
    if zero_init_residual:
        extra["zero_init_residual"] = True
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    except TypeError as e:  # the builder rejected an option
        key = "model.zero_init_residual" if "zero_init_residual" in str(e) else "model.kwargs"
        raise ConfigError(f"{key}: {arch} does not accept it ({e})") from None
