"""Optimisers and learning-rate schedules.

The schedule is a pure function of the epoch (`learning_rate(config, epoch)`), set on the optimiser at the start
of each epoch: nothing to drift, and a resumed run needs only the epoch number to be on the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch


@dataclass
class OptimConfig:
    optimizer: Literal["adam", "amsgrad", "adamw", "sgd"] = "adam"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD
    nesterov: bool = True  # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # Adam family
    scheduler: Literal["constant", "step", "multistep", "cosine"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [40, 70])  # multistep, epochs (0-based)
    step_size: int = 20  # step
    gamma: float = 0.1  # step and multistep decay factor
    min_lr_factor: float = 0.0  # cosine floor, as a fraction of lr
    warmup_epochs: int = 10  # linear warm-up from warmup_factor·lr to lr
    warmup_factor: float = 0.01
    clip_grad_norm: float = 0.0  # 0 = no clipping


def build_optimizer(params: Iterable, config: OptimConfig, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimiser named in `config`. fused=None: torch's fused kernels (one launch for all parameters instead
    of several per tensor) when the parameters are on CUDA, the default implementation elsewhere."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    if fused is None:
        fused = bool(tensors) and all(p.is_cuda for p in tensors)
    fused = {"fused": True} if fused else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay, **fused,
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **fused)
    return torch.optim.Adam(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
        amsgrad=config.optimizer == "amsgrad", **fused,
    )


def learning_rate(config: OptimConfig, epoch: int, total_epochs: int) -> float:
    """The learning rate of 0-based `epoch`: warm-up, then the decay schedule (counted from epoch 0, as
    torchreid's warm-up wraps its scheduler)."""
    if epoch < config.warmup_epochs:
        # Linear from warmup_factor·lr at epoch 0 to lr at epoch warmup_epochs.
        alpha = epoch / config.warmup_epochs
        return config.lr * (config.warmup_factor * (1 - alpha) + alpha)
    if config.scheduler == "step":
        return config.lr * config.gamma ** (epoch // config.step_size)
    if config.scheduler == "multistep":
        return config.lr * config.gamma ** sum(epoch >= m for m in config.milestones)
    if config.scheduler == "cosine":
        span = max(1, total_epochs - config.warmup_epochs)
        progress = (epoch - config.warmup_epochs) / span
        floor = config.min_lr_factor
        return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return config.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
