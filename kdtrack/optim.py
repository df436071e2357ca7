"""Optimizer and learning-rate schedule builders from `OptimConfig`."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kdtrack.config import OptimConfig
from kdtrack.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")


def build_optimizer(params: Iterable[Any], cfg: OptimConfig, *, prefix: str = "optim") -> torch.optim.Optimizer:
    """SGD (momentum, nesterov, weight decay) or AdamW, as `cfg.name` says.

    `prefix` is where `cfg` sits in the config, named in error hints: `optim` (teacher) or `student.optim`."""
    if not cfg.lr > 0:
        raise ConfigError(f"{prefix}.lr must be positive, got {cfg.lr}", f"e.g. --set {prefix}.lr=0.05")
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ConfigError(
                f"{prefix}.nesterov needs momentum > 0, got {prefix}.momentum={cfg.momentum}",
                f"e.g. --set {prefix}.momentum=0.9, or --set {prefix}.nesterov=false",
            )
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.name!r}", f"set {prefix}.name to one of: {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *,
                    prefix: str = "optim") -> torch.optim.lr_scheduler.LRScheduler | None:
    """Cosine over `cfg.epochs`, step decay, or None; the engine steps it once per epoch. `prefix` as for
    `build_optimizer`."""
    if cfg.epochs < 1:
        raise ConfigError(f"{prefix}.epochs must be at least 1, got {cfg.epochs}", f"e.g. --set {prefix}.epochs=30")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        if cfg.step_size < 1:
            raise ConfigError(f"{prefix}.step_size must be at least 1, got {cfg.step_size}",
                              f"e.g. --set {prefix}.step_size=10")
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "none":
        return None
    raise ConfigError(f"unknown schedule {cfg.schedule!r}", f"set {prefix}.schedule to one of: {', '.join(SCHEDULES)}")
