"""Factor transfer (Kim et al. 2018): a paraphraser autoencoder, pre-trained on the frozen teacher, defines
factors; a translator maps the student's last map into that factor space; L1 (p = 1) between normalised factors.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtrack.errors import ConfigError, TrainingError
from kdtrack.losses.layers import layer_shape, match_spatial, require_spatial, spatial_layers, stage_shapes, upcast
from kdtrack.models import capture_features


def _conv_bn_act(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Conv autoencoder on (B, C, H, W) teacher maps: `encode` gives (B, round(rate·C), H, W) factors."""

    def __init__(self, in_channels: int, rate: float) -> None:
        super().__init__()
        if in_channels < 1 or not 0 < rate <= 4:
            raise ConfigError(f"paraphraser needs in_channels >= 1 and 0 < rate <= 4, got {in_channels}, {rate}",
                              "the paper uses rate=0.5")
        self.in_channels, self.rate = in_channels, rate
        self.factor_channels = max(1, round(in_channels * rate))
        self.encoder = nn.Sequential(*_conv_bn_act(in_channels, in_channels),
                                     *_conv_bn_act(in_channels, self.factor_channels))
        # Linear last layer: the reconstruction target can take any sign.
        self.decoder = nn.Sequential(*_conv_bn_act(self.factor_channels, in_channels),
                                     nn.Conv2d(in_channels, in_channels, 3, 1, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher factor (B, factor_channels, H, W)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of `x` through the factor bottleneck."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Two conv-BN-LeakyReLU layers taking the student's (B, C_s, H, W) map to (B, factor_channels, H, W)."""

    def __init__(self, in_channels: int, factor_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*_conv_bn_act(in_channels, in_channels), *_conv_bn_act(in_channels, factor_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Student factor."""
        return self.net(x)


def factor_transfer_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """Element-mean |u - v| of the per-sample flattened, L2-normalised factors (p = 1 as in the paper).

    Factors of different H, W are average-pooled to the smaller size first.
    """
    student, teacher = match_spatial(upcast(student_factor), upcast(teacher_factor.detach()))
    return F.l1_loss(F.normalize(student.flatten(1), dim=1), F.normalize(teacher.flatten(1), dim=1))


class FactorTransfer(nn.Module):
    """Frozen paraphraser (eval mode whatever `train()` says) plus a trainable translator.

    The term is weight · sqrt(N) · factor_transfer_loss with N the factor size: the element mean of unit
    vectors shrinks as 1/sqrt(N), so rescaled it lies in [0, 2] for any factor size.
    """

    name = "ft"

    def __init__(self, student_layer: str, teacher_layer: str, paraphraser: Paraphraser, student_channels: int,
                 weight: float) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.paraphraser = paraphraser.requires_grad_(False).eval()
        self.translator = Translator(student_channels, paraphraser.factor_channels)
        self.weight = weight

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...], *,
                    paraphraser: Paraphraser | None = None, rate: float = 0.5, student_layer: str | None = None,
                    teacher_layer: str | None = None, weight: float = 1.0) -> FactorTransfer:
        """Layers default to each model's last conv stage; a new paraphraser must be trained before use."""
        student_layer = student_layer or _last_spatial(student, input_shape)
        teacher_layer = teacher_layer or _last_spatial(teacher, input_shape)
        s_shape = layer_shape(student, input_shape, student_layer)
        t_shape = layer_shape(teacher, input_shape, teacher_layer)
        require_spatial("factor transfer", "student", student_layer, s_shape)
        require_spatial("factor transfer", "teacher", teacher_layer, t_shape)
        if paraphraser is None:
            paraphraser = Paraphraser(t_shape[0], rate)
        elif paraphraser.in_channels != t_shape[0]:
            raise ConfigError(f"paraphraser takes {paraphraser.in_channels} channels but teacher layer "
                              f"{teacher_layer!r} has {t_shape[0]}", "train the paraphraser on that teacher layer")
        return cls(student_layer, teacher_layer, paraphraser, s_shape[0], weight)

    def train(self, mode: bool = True) -> FactorTransfer:
        super().train(mode)
        self.paraphraser.eval()  # its BatchNorm statistics belong to the pre-training
        return self

    def forward(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """weight · sqrt(N) · L1 between the translated student factor and the paraphrased teacher factor."""
        with torch.no_grad():
            teacher = self.paraphraser.encode(teacher_feats[self.teacher_layers[0]])
        student, teacher = match_spatial(self.translator(student_feats[self.student_layers[0]]), teacher)
        return self.weight * math.sqrt(teacher[0].numel()) * factor_transfer_loss(student, teacher)


def _last_spatial(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    stages = spatial_layers(stage_shapes(model, input_shape))
    if not stages:
        raise ConfigError(f"factor transfer needs a (C, H, W) conv stage but {type(model).__name__} has none",
                          "use fitnet or rkd for models without 2d conv stages (an mlp, a 1d conv net)")
    return stages[-1]


def train_paraphraser(paraphraser: Paraphraser, teacher: nn.Module, loader: Iterable[Sequence[Any]], *, layer: str,
                      epochs: int, lr: float, device: torch.device) -> list[float]:
    """Fit the paraphraser to reconstruct (MSE) the frozen, eval-mode teacher's `layer`; per-epoch mean losses.

    The paraphraser is left in eval mode with its requires_grad as found (so a FactorTransfer's frozen one
    can be trained in place); the teacher's train/eval mode is restored.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"paraphraser training needs epochs >= 1, got {epochs!r}",
                          "e.g. --set kd.paraphraser_epochs=10")
    if not (math.isfinite(lr) and lr > 0):  # not a config key: the stage passes its own rate
        raise ConfigError(f"paraphraser training needs a finite lr > 0, got {lr!r}", "pass e.g. lr=1e-3")
    was_training = teacher.training
    teacher.eval()
    frozen = not any(p.requires_grad for p in paraphraser.parameters())
    paraphraser.to(device).requires_grad_(True).train()
    optimizer = torch.optim.Adam(paraphraser.parameters(), lr=lr)
    history = []
    try:
        for epoch in range(epochs):
            total, seen = torch.zeros((), device=device), 0
            for batch in loader:
                x = batch[0].to(device, non_blocking=True)
                with torch.no_grad(), capture_features(teacher, [layer]) as feats:
                    teacher(x)
                target = feats[layer]  # (B, C, H, W)
                loss = F.mse_loss(paraphraser(target), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(x)
                seen += len(x)
            mean = float(total) / max(seen, 1)
            if seen == 0 or not math.isfinite(mean):
                raise TrainingError(f"paraphraser reconstruction loss is {mean} at epoch {epoch} ({seen} samples)",
                                    "check the loader yields batches and lower lr")
            history.append(mean)
    finally:
        teacher.train(was_training)
        paraphraser.requires_grad_(not frozen).eval()
    return history
