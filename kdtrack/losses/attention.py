"""Attention transfer (Zagoruyko & Komodakis 2017): match where in the image each stage's activations are large."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdtrack.errors import ConfigError
from kdtrack.losses.layers import layer_shape, require_spatial, spatial_layers, stage_shapes, upcast


def attention_map(feat: torch.Tensor, p: float = 2.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): channel mean of |f|^p, bilinearly resized to `size` if given, L2-normalised."""
    am = upcast(feat).abs().pow(p).mean(dim=1)  # (B, H, W)
    if size is not None and tuple(am.shape[-2:]) != tuple(size):
        # Resize the one-channel map, not the C-channel features: C times cheaper, and it is what is compared.
        am = F.interpolate(am[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return F.normalize(am.flatten(1), p=2, dim=1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over (B, H·W) of (a_s - a_t)², the student map resized to the teacher's H, W first."""
    teacher = attention_map(teacher_feat.detach(), p)
    student = attention_map(student_feat, p, size=teacher_feat.shape[-2:])
    return (student - teacher).square().mean()


class AttentionTransfer(nn.Module):
    """β/2 · mean over layer pairs of `at_loss` (β = 1000 as commonly used for AT); no trainable parameters.

    With a per-pair loss of mean (a_s - a_t)² over H·W positions of unit vectors, β/2 = 500 keeps the term O(1)
    on 8x8-32x32 maps.
    """

    name = "at"

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], beta: float = 1000.0,
                 p: float = 2.0) -> None:
        super().__init__()
        if not student_layers or len(student_layers) != len(teacher_layers):
            raise ConfigError(f"attention transfer pairs layers one to one, got {list(student_layers)} and "
                              f"{list(teacher_layers)}", "pass as many student layers as teacher layers (>= 1)")
        self.student_layers, self.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        self.beta, self.p = beta, p

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...], *,
                    student_layers: Sequence[str] | None = None, teacher_layers: Sequence[str] | None = None,
                    beta: float = 1000.0, p: float = 2.0) -> AttentionTransfer:
        """Defaults pair all conv stages by position; with unequal counts the deepest stages are paired."""
        if student_layers is None or teacher_layers is None:
            s_stages = spatial_layers(stage_shapes(student, input_shape))
            t_stages = spatial_layers(stage_shapes(teacher, input_shape))
            n = min(len(s_stages), len(t_stages))
            if n == 0:
                raise ConfigError("attention transfer needs (C, H, W) conv stages in both student and teacher",
                                  "use fitnet or rkd for models without 2d conv stages (an mlp, a 1d conv net)")
            student_layers = student_layers or s_stages[len(s_stages) - n:]
            teacher_layers = teacher_layers or t_stages[len(t_stages) - n:]
        for role, model, names in (("student", student, student_layers), ("teacher", teacher, teacher_layers)):
            for name in names:
                require_spatial("attention transfer", role, name, layer_shape(model, input_shape, name))
        return cls(student_layers, teacher_layers, beta, p)

    def forward(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """β/2 · mean over pairs of the attention-map distance."""
        losses = [at_loss(student_feats[s], teacher_feats[t], self.p)
                  for s, t in zip(self.student_layers, self.teacher_layers)]
        return self.beta / 2 * torch.stack(losses).mean()
