"""SGD with the classic ImageNet recipe's options, and the learning-rate schedule."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch

from .config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``cfg.lr`` is for a batch of 256."""
    return cfg.lr * global_batch / 256


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.SGD:
    """SGD with momentum; with ``no_decay_bn_bias``, BN parameters and biases (all the 1-d
    tensors) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.no_decay_bn_bias:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    return torch.optim.SGD(groups, lr=scaled_lr(cfg, global_batch), momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


def lr_factor(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the peak lr at optimizer step ``i``: linear warmup from
    ``warmup_start_factor`` over ``warmup_epochs``, then cosine to 0, steps of ``step_gamma``
    at ``step_milestones``, or linear to 0. Per step, so warmup is smooth at any batch size."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in cfg.step_milestones]

    def factor(i: int) -> float:
        if i < warmup:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * i / warmup
        t = min(1.0, (i - warmup) / max(1, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.schedule == "linear":
            return 1 - t
        return cfg.step_gamma ** bisect.bisect_right(milestones, i)

    return factor


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int,
                     steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler; its state (the step count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, epochs, steps_per_epoch))
