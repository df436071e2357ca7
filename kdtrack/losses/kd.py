"""Logit distillation (Hinton et al. 2015): temperature-softened KL or soft cross-entropy, confidence
weighting, a warmup/ramp schedule for the KD weight, regression distillation, and the engine-ready `LogitKD`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtrack.augment import mix_targets
from kdtrack.engine import batch_mix, masked_cross_entropy
from kdtrack.errors import BadInput, ConfigError

LOSS_TYPES = ("kldiv", "soft_ce")
REDUCTIONS = ("batchmean", "mean", "sum", "none")
WEIGHTINGS = ("none", "pmax", "threshold")
REGRESSIONS = ("none", "mse", "l1")
# Order of the per-step statistics kept as one tensor, so a step costs no host sync.
_STAT_NAMES = ("total_loss", "ce_loss", "kd_loss", "kd_weight", "ce_weight", "coverage", "avg_confidence")


def check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ConfigError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}", f"use one of: {', '.join(choices)}")


def check_temperature(temperature: float) -> None:
    """Raise ConfigError unless `temperature` is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}",
                          "e.g. --set kd.temperature=4.0")


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, rank: int | None = 2) -> None:
    if student.shape != teacher.shape or (rank is not None and student.dim() != rank) or student.shape[0] == 0:
        want = "(B, C) logits" if rank == 2 else "(B, ...) outputs"
        raise BadInput(f"student and teacher need the same non-empty {want}, got {tuple(student.shape)} "
                       f"and {tuple(teacher.shape)}", "check the teacher has the student's classes and batch rows")


def _float(t: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 logits (AMP, a float16 cache) are upcast; float64 stays float64.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    loss_type: str = "kldiv",
    reduction: str = "batchmean",
) -> torch.Tensor:
    """T² · KL(p_t || p_s) ('kldiv') or T² · CE(p_t, p_s) ('soft_ce') of (B, C) logits softened by T.

    The teacher is detached. Reductions: 'none' (B,), 'batchmean' sum/B, 'sum', and 'mean' = sum/(B·C),
    the element-wise mean of torch's KLDivLoss(reduction='mean') (usually not what you want).
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    # log_softmax on both sides stays finite for logits of any size; no clamping needed.
    log_p_s = F.log_softmax(_float(student_logits) / temperature, dim=1)  # (B, C)
    log_p_t = F.log_softmax(_float(teacher_logits.detach()) / temperature, dim=1)
    p_t = log_p_t.exp()
    inner = log_p_t - log_p_s if loss_type == "kldiv" else -log_p_s
    # 0 · log 0 = 0: a class the teacher rules out (p_t = 0, e.g. a -inf logit) adds nothing, not nan.
    per_sample = torch.where(p_t > 0, p_t * inner, torch.zeros_like(p_t)).sum(dim=1) * temperature**2  # (B,)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.sum() / student_logits.numel()
    return per_sample.sum() / student_logits.shape[0]


def regression_loss(
    student_outputs: torch.Tensor, teacher_outputs: torch.Tensor, loss_type: str
) -> torch.Tensor:
    """Per-sample (B,) mean squared ('mse') or absolute ('l1') error onto the detached teacher outputs (B, ...)."""
    check_choice("regression", loss_type, REGRESSIONS[1:])
    _check_pair(student_outputs, teacher_outputs, rank=None)
    diff = (_float(student_outputs) - _float(teacher_outputs.detach())).flatten(1)  # (B, D)
    return (diff.square() if loss_type == "mse" else diff.abs()).mean(dim=1)


def _confidence(teacher_logits: torch.Tensor, weighting: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    confidence = F.softmax(_float(teacher_logits.detach()), dim=1).amax(dim=1)  # (B,), at T = 1
    if weighting == "pmax":
        return confidence, confidence
    if weighting == "threshold":
        return (confidence >= threshold).to(confidence.dtype), confidence
    return torch.ones_like(confidence), confidence


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"confidence threshold must be a probability in [0, 1], got {threshold!r}",
                          "e.g. --set kd.confidence_threshold=0.5")


def compute_confidence_weights(
    teacher_logits: torch.Tensor, weighting: str, threshold: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-sample KD weights (B,) from the teacher's max softmax probability (T = 1) and summary stats.

    'none' -> 1, 'pmax' -> the confidence, 'threshold' -> 1 where confidence >= threshold else 0.
    """
    check_choice("kd.weighting", weighting, WEIGHTINGS)
    _check_threshold(threshold)
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] == 0:
        raise BadInput(f"teacher logits must be a non-empty (B, C) tensor, got {tuple(teacher_logits.shape)}",
                       "pass one row of class logits per sample")
    weights, confidence = _confidence(teacher_logits, weighting, threshold)
    values = torch.stack([(weights > 0).to(confidence.dtype).mean(), confidence.mean(),
                          confidence.min(), confidence.max()]).tolist()
    return weights, dict(zip(("coverage", "avg_confidence", "min_confidence", "max_confidence"), values))


def compute_kd_weight(epoch: int, warmup_epochs: int, kd_ramp_epochs: int, target_alpha: float) -> float:
    """0 before `warmup_epochs`, then a linear ramp over `kd_ramp_epochs` up to `target_alpha`, then flat."""
    if epoch < warmup_epochs:
        return 0.0
    if kd_ramp_epochs > 0 and epoch < warmup_epochs + kd_ramp_epochs:
        return target_alpha * (epoch - warmup_epochs) / kd_ramp_epochs
    return float(target_alpha)


@dataclass(frozen=True)
class KDLossConfig:
    """Logit-KD settings. `regression` != 'none' distils real-valued outputs instead of class logits: then
    temperature, alpha, schedule and weighting do not apply and the loss is the regression term alone.
    """

    temperature: float = 4.0
    kd_alpha: float = 0.7  # KD weight once warmup and ramp are over; CE gets 1 - kd_alpha
    loss_type: str = "kldiv"
    kd_weighting: str = "none"
    confidence_threshold: float = 0.0
    warmup_epochs: int = 0  # CE only before this epoch
    kd_ramp_epochs: int = 0
    regression: str = "none"
    label_smoothing: float = 0.0  # CE term only

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("kd.weighting", self.kd_weighting, WEIGHTINGS)
        check_choice("regression", self.regression, REGRESSIONS)
        _check_threshold(self.confidence_threshold)
        # field -> (bounds, the config key users set it with, an example value)
        for name, low, high, key, example in (("kd_alpha", 0.0, 1.0, "kd.alpha", 0.5),
                                              ("label_smoothing", 0.0, 0.999, "train.label_smoothing", 0.1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}", f"e.g. --set {key}={example}")
        for name, key in (("warmup_epochs", "kd.warmup_epochs"), ("kd_ramp_epochs", "kd.ramp_epochs")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}", f"e.g. --set {key}=5")


def _student_terms(
    student_outputs: torch.Tensor, teacher_outputs: torch.Tensor, targets: torch.Tensor | None,
    config: KDLossConfig, epoch: int, domain_mask: torch.Tensor | None, mix: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted CE and KD terms (they sum to the loss) and the `_STAT_NAMES` values as one tensor; no host sync."""
    batch = student_outputs.shape[0]
    if domain_mask is not None and tuple(domain_mask.shape) != (batch,):
        raise BadInput(f"domain mask must have shape ({batch},), got {tuple(domain_mask.shape)}",
                       "pass one bool per sample: True where KD applies")
    if config.regression != "none":
        # Signals have no classes: the loss is the regression term alone; targets are ignored.
        kd_weight, ce_weight = 1.0, 0.0
        per_sample = regression_loss(student_outputs, teacher_outputs, config.regression)  # (B,)
        weights, confidence = torch.ones_like(per_sample), torch.full_like(per_sample, math.nan)
        ce = per_sample.new_zeros(())
    else:
        if targets is None or tuple(targets.shape) != (batch,):
            raise BadInput(f"targets must be a ({batch},) tensor of class ids (-1 for unlabelled), got "
                           f"{None if targets is None else tuple(targets.shape)}", "pass the batch's labels y")
        kd_weight = compute_kd_weight(epoch, config.warmup_epochs, config.kd_ramp_epochs, config.kd_alpha)
        ce_weight = 1.0 - kd_weight
        ce = masked_cross_entropy(student_outputs, targets, config.label_smoothing, mix)
        per_sample = kd_loss(student_outputs, teacher_outputs, config.temperature, config.loss_type, "none")
        weights, confidence = _confidence(teacher_outputs, config.kd_weighting, config.confidence_threshold)
    if domain_mask is not None:
        weights = weights * domain_mask.to(weights.dtype)
    # Divided by B, not by the weight sum: masking or thresholding lowers the KD term, never rescales it.
    kd = (per_sample * weights).sum() / batch
    ce_term, kd_term = ce_weight * ce, kd_weight * kd
    # new_full fills on the device; new_tensor would copy from the host and wait for the CUDA stream every step
    stats = torch.stack([
        (ce_term + kd_term).detach(), ce.detach(), kd.detach(), kd.new_full((), kd_weight), kd.new_full((), ce_weight),
        (weights > 0).to(kd.dtype).mean(), confidence.mean().to(kd.dtype),
    ])  # (len(_STAT_NAMES),)
    return ce_term, kd_term, stats


def compute_student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    config: KDLossConfig,
    current_epoch: int,
    domain_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`ce_weight · CE(labelled) + kd_weight · sum_i w_i · KD_i / B` with w = confidence weight × domain mask.

    Unlabelled rows (target -1) get KD but no CE; avg_confidence is over the whole batch. In regression mode
    `targets` may be None, the loss is the regression term alone (ce_weight 0, kd_weight 1), no avg_confidence.
    """
    ce_term, kd_term, stats = _student_terms(student_logits, teacher_logits, targets, config, current_epoch,
                                             domain_mask)
    values = dict(zip(_STAT_NAMES, stats.tolist()))
    if config.regression != "none":
        del values["avg_confidence"]
    return ce_term + kd_term, values


def mixed_teacher_outputs(teacher: torch.Tensor, mix: Any, config: KDLossConfig) -> torch.Tensor:
    """Teacher outputs for mixed inputs from those of the samples: the probabilities at temperature T mixed with the
    inputs' λ and partner, given back as logits T·log p (whose softmax at T is exactly that mix); signal outputs
    (regression) mixed linearly."""
    if config.regression != "none":
        return mix_targets(teacher.float(), mix)
    mixed = mix_targets(torch.softmax(teacher.float() / config.temperature, dim=1), mix)
    return config.temperature * torch.log(mixed.clamp_min(torch.finfo(torch.float32).tiny))


class LogitKD:
    """Engine loss `(model, batch, epoch) -> (outputs, {"ce": ..., "kd": ...})`, terms already weighted.

    `teacher_logits_fn(batch)` gives the teacher's outputs for the batch (a cached table lookup or a forward);
    with `domain_index` set, only samples whose `domain` equals it get KD.
    """

    def __init__(self, teacher_logits_fn: Callable[[Sequence[Any]], torch.Tensor],
                 config: KDLossConfig, domain_index: int | None = None, *, mixes_targets: bool = False) -> None:
        self.teacher_logits_fn = teacher_logits_fn
        self.config = config
        self.domain_index = domain_index
        # True when the teacher outputs are of each sample's own input (a cache): mixup then mixes them as it mixed
        # the inputs; False for a live teacher, which already saw the mixed input
        self.mixes_targets = mixes_targets
        self._sums: torch.Tensor | None = None  # running sums of the step stats, on the loss's device
        self._steps = 0

    def __call__(
        self, model: nn.Module, batch: Sequence[Any], epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch[0], batch[1]
        outputs = model(x)
        teacher = self.teacher_logits_fn(batch).to(outputs.device, non_blocking=True)
        mix = batch_mix(batch)
        if mix is not None and self.mixes_targets:
            teacher = mixed_teacher_outputs(teacher, mix, self.config)
        mask = None
        if self.domain_index is not None:
            mask = batch[3].to(outputs.device) == self.domain_index  # (B,)
        ce_term, kd_term, stats = _student_terms(outputs, teacher, y, self.config, epoch, mask, mix)
        self._sums = stats if self._sums is None else self._sums + stats
        self._steps += 1
        return outputs, {"ce": ce_term, "kd": kd_term}

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (one host sync), then reset; {} when no step ran. What a student logs beside
        the weighted terms `loss_ce` and `loss_kd` (which the engine logs): `ce_labelled` (the unweighted CE on
        labelled rows, as the no-KD baseline logs it), `kd_weight` (CE gets 1 - kd_weight), `coverage` and
        `avg_confidence`. The total and unweighted KD would repeat `loss`, `loss_kd` / `kd_weight`."""
        if self._sums is None:
            return {}
        means = dict(zip(_STAT_NAMES, (self._sums / self._steps).tolist()))
        self._sums, self._steps = None, 0
        if self.config.regression != "none":  # signals: no labels, no class confidence
            return {"kd_weight": means["kd_weight"], "coverage": means["coverage"]}
        return {"ce_labelled": means["ce_loss"], **{k: means[k] for k in ("kd_weight", "coverage", "avg_confidence")}}
