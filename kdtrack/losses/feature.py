"""Feature distillation: the method registry, `build_feature_method`, and the engine loss `FeatureKD`.

Every method is an nn.Module with a registry `name`, the module names it hooks (`student_layers`,
`teacher_layers`), a `from_models(student, teacher, input_shape, **options)` constructor that picks default
layers and sizes connectors, and `forward(student_feats, teacher_feats) -> scalar loss`, so the trainer needs
no per-method branches. Defaults keep every term O(1), so `(1 - alpha) · CE + alpha · feature` is balanced.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdtrack.engine import LabelledCE, batch_mix, masked_cross_entropy
from kdtrack.errors import ConfigError
from kdtrack.losses.attention import AttentionTransfer
from kdtrack.losses.factor_transfer import FactorTransfer
from kdtrack.losses.fitnet import FitNet
from kdtrack.losses.kd import check_choice
from kdtrack.losses.rkd import RKD
from kdtrack.models import capture_features

FEATURE_METHODS: dict[str, type[nn.Module]] = {
    cls.name: cls for cls in (FitNet, RKD, FactorTransfer, AttentionTransfer)
}
_MODEL_ARGS = ("cls", "student", "teacher", "input_shape")


def build_feature_method(name: str, student: nn.Module, teacher: nn.Module, input_shape: Sequence[int],
                         **options: Any) -> nn.Module:
    """The registered method `name` with default or given layers, connectors on the student's device.

    Options are the method's `from_models` keywords (layer names, loss weights, a trained paraphraser, ...).
    """
    check_choice("feature method", name, tuple(FEATURE_METHODS))
    cls = FEATURE_METHODS[name]
    accepted = [p for p in inspect.signature(cls.from_models).parameters if p not in _MODEL_ARGS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"feature method {name} does not take option {unknown[0]!r}",
                          f"it takes: {', '.join(accepted)}")
    method = cls.from_models(student, teacher, tuple(input_shape), **options)
    return method.to(next(student.parameters()).device)


class FeatureKD:
    """Engine loss `(model, batch, epoch) -> (logits, {"ce": ..., <method name>: ...})`, terms already weighted.

    total = (1 - alpha) · CE(labelled rows) + alpha · feature loss. The teacher is frozen here (requires_grad
    off, eval mode, no_grad forward); optimise the student together with `method.parameters()`.
    """

    def __init__(self, method: nn.Module, teacher: nn.Module, alpha: float, label_smoothing: float = 0.0) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"feature KD alpha must be in [0, 1], got {alpha!r}", "e.g. --set kd.alpha=0.5")
        self.method = method
        self.teacher = teacher.requires_grad_(False).eval()
        self.alpha = float(alpha)
        self.label_smoothing = label_smoothing
        self.stats = LabelledCE()

    def __call__(
        self, model: nn.Module, batch: Sequence[Any], epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch[0], batch[1]
        self.teacher.eval()
        self.method.train(model.training)  # connector BatchNorm follows the student
        with torch.no_grad(), capture_features(self.teacher, self.method.teacher_layers) as teacher_feats:
            self.teacher(x)
        with capture_features(model, self.method.student_layers) as student_feats:
            logits = model(x)  # (B, C)
        mix = batch_mix(batch)  # the teacher saw the same mixed inputs: only the labels need mixing
        ce = masked_cross_entropy(logits, y, self.label_smoothing, mix)
        self.stats.add(logits, y, ce if self.label_smoothing == 0 else None, mix)
        feature = self.method(student_feats, teacher_feats)
        return logits, {"ce": (1.0 - self.alpha) * ce, self.method.name: self.alpha * feature}

    def pop_stats(self) -> dict[str, float]:
        """`{"ce_labelled": ...}`: the unweighted CE on labelled rows, as every student logs it (LabelledCE)."""
        return self.stats.pop()
