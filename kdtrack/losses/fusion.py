"""Multi-teacher fusion: several teachers' (B, C) logits become one (B, C) target for `kd_loss`.

'mean' and 'weighted' average in logit space (the usual choice: the fused logits are then softened by the KD
temperature like a single teacher's); 'most_confident' picks, per sample, one teacher's logits unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdtrack.errors import BadInput
from kdtrack.losses.kd import check_choice, check_temperature

FUSION_METHODS = ("mean", "weighted", "most_confident")


def _stacked(teacher_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(teacher_logits, torch.Tensor):
        stacked = teacher_logits
    else:
        shapes = {tuple(t.shape) for t in teacher_logits}
        if len(shapes) > 1:
            raise BadInput(f"teachers disagree on logit shape: {sorted(shapes)}",
                           "fuse teachers over the same batch rows and classes")
        stacked = torch.stack(list(teacher_logits)) if shapes else torch.empty(0)
    if stacked.dim() != 3 or 0 in stacked.shape:
        raise BadInput(f"teacher logits must stack to a non-empty (K, B, C) tensor, got {tuple(stacked.shape)}",
                       "pass a list of (B, C) logits, one per teacher")
    return stacked.detach()


def _normalised_weights(weights: Sequence[float] | torch.Tensor | None, k: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        raise BadInput("method='weighted' needs weights", f"pass weights=[...] with one number per teacher ({k})")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != k:
        raise BadInput(f"got {w.numel()} weights for {k} teachers", "pass exactly one weight per teacher")
    total = float(w.sum())
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not (math.isfinite(total) and total > 0):
        raise BadInput(f"teacher weights must be finite, >= 0 and not all 0, got {w.tolist()}",
                       "e.g. --set kd.fusion_weights=[2,1] (normalised to sum 1)")
    return (w / total).to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def fuse_teachers(
    teacher_logits: Sequence[torch.Tensor] | torch.Tensor,
    method: str = "mean",
    weights: Sequence[float] | torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Fuse K teachers' logits (K, B, C) into (B, C): logit mean, weighted logit mean, or most confident.

    `temperature` only softens the probabilities whose max ranks teachers for 'most_confident'
    (ties go to the lowest teacher index); weights are normalised to sum 1.
    """
    check_choice("fusion method", method, FUSION_METHODS)
    stacked = _stacked(teacher_logits)  # (K, B, C)
    if method == "mean":
        return stacked.mean(dim=0)
    if method == "weighted":
        w = _normalised_weights(weights, stacked.shape[0], stacked)
        return (w[:, None, None] * stacked).sum(dim=0)
    check_temperature(temperature)
    probs = F.softmax(stacked.to(torch.promote_types(stacked.dtype, torch.float32)) / temperature, dim=2)
    confidence = probs.amax(dim=2)  # (K, B)
    best = confidence.argmax(dim=0)  # (B,); argmax returns the first maximum, so ties -> lowest index
    rows = torch.arange(stacked.shape[1], device=stacked.device)
    return stacked[best, rows]
