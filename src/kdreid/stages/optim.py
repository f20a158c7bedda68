"""Optimisers and learning-rate schedules.

The schedule is a pure function of the epoch (`learning_rate(config, epoch)`), set on the optimiser at the start
of each epoch: nothing to drift, and a resumed run needs only the epoch number to be on the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch

from kdreid.errors import ConfigError


def check_setting(ok: bool, setting: str, value, allowed: str) -> None:
    """A value no run can use: one ConfigError naming the setting as the user writes it (its flag, or its config
    key such as `train.optim.weight_decay`), the value and what is allowed. Write `ok` so that NaN fails it
    (`0 <= x < math.inf`, not `not x < 0`)."""
    if not ok:
        raise ConfigError(f"{setting} must be {allowed}, got {value}")


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

    def validate(self) -> None:
        """Values no optimiser or schedule can use (torch would stop on some with a traceback, others would train
        on a negative or growing learning rate), checked before any work — each where this run uses it: a setting
        of another optimiser or schedule than the one chosen is left alone, as the run leaves it."""
        check_setting(0 < self.lr < math.inf, "--lr", self.lr, "positive")
        key = "train.optim."
        check_setting(0 <= self.weight_decay < math.inf, key + "weight_decay", self.weight_decay, "0 or more")
        if self.optimizer == "sgd":
            check_setting(0 <= self.momentum < 1, key + "momentum", self.momentum, "in [0, 1)")
        else:
            check_setting(all(0 <= beta < 1 for beta in self.betas), key + "betas", list(self.betas),
                          "two numbers, each in [0, 1)")
        if self.scheduler == "multistep":
            # The 0-based epochs from which the rate is multiplied by gamma once more (one named twice decays twice
            # there, as torch's MultiStepLR does: a shortened schedule can round two milestones to one epoch).
            check_setting(all(m >= 0 for m in self.milestones), key + "milestones", list(self.milestones),
                          "0-based epochs (0 or more)")
        if self.scheduler == "step":
            check_setting(self.step_size >= 1, key + "step_size", self.step_size, "at least 1 (epochs)")
        if self.scheduler in ("step", "multistep"):
            check_setting(0 < self.gamma < math.inf, key + "gamma", self.gamma, "positive (the factor of each decay)")
        if self.scheduler == "cosine":
            check_setting(0 <= self.min_lr_factor <= 1, key + "min_lr_factor", self.min_lr_factor,
                          "in [0, 1] (the cosine floor, a fraction of --lr)")
        check_setting(self.warmup_epochs >= 0, key + "warmup_epochs", self.warmup_epochs, "0 (no warm-up) or more")
        if self.warmup_epochs > 0:
            check_setting(0 < self.warmup_factor <= 1, key + "warmup_factor", self.warmup_factor,
                          "in (0, 1] (the first epoch's fraction of --lr)")
        check_setting(0 <= self.clip_grad_norm < math.inf, key + "clip_grad_norm", self.clip_grad_norm,
                      "0 (no clipping) or positive")


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
