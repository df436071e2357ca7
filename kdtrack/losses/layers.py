"""Which feature layers a feature-distillation method hooks, their shapes, and matching map sizes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtrack.errors import ConfigError
from kdtrack.models import feature_shapes


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 features (AMP) as float32 for the loss arithmetic; float32 and float64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def stage_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each of `model.feature_layers`, in order (penultimate embedding last)."""
    if not getattr(model, "feature_layers", ()):
        raise ConfigError(f"{type(model).__name__} lists no feature_layers",
                          "name the layers to hook explicitly, or use a model from kdtrack.models")
    return feature_shapes(model, tuple(input_shape))


def spatial_layers(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names whose output is a (C, H, W) map, in order."""
    return [name for name, shape in shapes.items() if len(shape) == 3]


def layer_shape(model: nn.Module, input_shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Per-sample output shape of one named module (ModelError when the model has no such module)."""
    return feature_shapes(model, tuple(input_shape), [name])[name]


def require_spatial(method: str, role: str, name: str, shape: tuple[int, ...]) -> None:
    """ConfigError unless layer `name` gives a (C, H, W) map."""
    if len(shape) != 3:
        raise ConfigError(f"{method} needs a (C, H, W) feature map but {role} layer {name!r} gives {shape}",
                          "pick a conv stage (a layer before the global pool)")


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of two (B, C, H, W) maps is larger, per axis, down to the smaller H and W."""
    if a.dim() != 4 or a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)  # identity for the smaller map
