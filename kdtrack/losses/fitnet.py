"""FitNets (Romero et al. 2015): a regressor maps the student's guided layer onto the teacher's hint layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtrack.errors import ConfigError
from kdtrack.losses.layers import layer_shape, match_spatial, spatial_layers, stage_shapes, upcast


def fitnet_loss(regressed_student: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between the regressed student features and the detached teacher hint, (B, C, H, W) or (B, D).

    Maps of different H, W are compared after average-pooling the larger one down to the smaller size.
    """
    student, teacher = match_spatial(upcast(regressed_student), upcast(teacher_feat.detach()))
    if student.shape != teacher.shape:
        raise ConfigError(f"fitnet regressor output {tuple(student.shape)} does not match the hint "
                          f"{tuple(teacher.shape)}", "size the regressor with the hint layer's channels")
    return F.mse_loss(student, teacher)


def _regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    raise ConfigError(f"fitnet pairs a guided layer of shape {student_shape} with a hint of shape {teacher_shape}",
                      "pick two (C, H, W) maps or two (D,) vectors")


class FitNet(nn.Module):
    """Hint loss with a trainable regressor: 1x1 conv for (C, H, W) maps, linear for (D,) vectors."""

    name = "fitnet"

    def __init__(self, student_layer: str, teacher_layer: str, student_shape: tuple[int, ...],
                 teacher_shape: tuple[int, ...], weight: float = 1.0) -> None:
        super().__init__()
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.regressor = _regressor(tuple(student_shape), tuple(teacher_shape))
        self.weight = weight

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...], *,
                    student_layer: str | None = None, teacher_layer: str | None = None,
                    weight: float = 1.0) -> FitNet:
        """Guided and hint layers default to each model's middle conv stage (middle feature layer if none)."""
        student_layer = student_layer or _middle(stage_shapes(student, input_shape))
        teacher_layer = teacher_layer or _middle(stage_shapes(teacher, input_shape))
        return cls(student_layer, teacher_layer, layer_shape(student, input_shape, student_layer),
                   layer_shape(teacher, input_shape, teacher_layer), weight)

    def forward(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """weight · MSE(regressor(guided), hint)."""
        guided = student_feats[self.student_layers[0]]
        return self.weight * fitnet_loss(self.regressor(guided), teacher_feats[self.teacher_layers[0]])


def _middle(shapes: dict[str, tuple[int, ...]]) -> str:
    """The middle (C, H, W) stage; without one (an mlp, a 1d conv net) the middle (D,) embedding."""
    candidates = spatial_layers(shapes) or [name for name, shape in shapes.items() if len(shape) == 1]
    return candidates[len(candidates) // 2]
