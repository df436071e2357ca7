"""Relational KD (Park et al. 2019): match the distance and angle structure of a batch of embeddings.

The paper weights distance 25 and angle 50; added to CE by alpha mixing on small data those drown the CE
term, so the defaults here keep the paper's 1:2 ratio at w_dist=1, w_angle=2 (an O(1) term); both are exposed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdtrack.losses.layers import layer_shape, stage_shapes, upcast

_EPS = 1e-12


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances; clamped so equal embeddings give a zero, not nan, gradient."""
    sq = e.square().sum(dim=1)  # (B,)
    # The Gram form needs O(B²) memory where explicit differences would need O(B² D).
    return (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp(min=_EPS).sqrt()


def _normalised_distances(e: torch.Tensor, off_diagonal: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distances(e)[off_diagonal]  # (B(B-1),) ordered pairs i != j
    return d / d.mean().clamp(min=_EPS)


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between student and teacher pairwise distances, each divided by its own mean over pairs i != j.

    Embeddings are flattened to (B, D); dimensions may differ between the two. Zero for B < 2.
    """
    s, t = upcast(student_emb.flatten(1)), upcast(teacher_emb.detach().flatten(1))
    batch = s.shape[0]
    if batch < 2:
        return s.sum() * 0.0
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=s.device)  # (B, B)
    return F.smooth_l1_loss(_normalised_distances(s, off_diagonal), _normalised_distances(t, off_diagonal))


def _angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, B): entry [j, i, k] is the cosine of the angle at e_j between e_i and e_k."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, D): [j, i] = unit(e_i - e_j)
    return unit @ unit.transpose(1, 2)


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between student and teacher angle cosines over all ordered triplets of distinct samples.

    Embeddings are flattened to (B, D); zero for B < 3. Memory is O(B² D + B³).
    """
    s, t = upcast(student_emb.flatten(1)), upcast(teacher_emb.detach().flatten(1))
    batch = s.shape[0]
    if batch < 3:
        return s.sum() * 0.0
    idx = torch.arange(batch, device=s.device)
    j, i, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    distinct = (i != j) & (k != j) & (i != k)  # (B, B, B)
    return F.smooth_l1_loss(_angles(s)[distinct], _angles(t)[distinct])


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, w_dist: float = 1.0,
             w_angle: float = 2.0) -> torch.Tensor:
    """w_dist · distance term + w_angle · angle term (paper: 25 and 50; see the module note)."""
    return w_dist * rkd_distance_loss(student_emb, teacher_emb) + w_angle * rkd_angle_loss(student_emb, teacher_emb)


class RKD(nn.Module):
    """RKD on one embedding layer per model (default: the penultimate one); no trainable parameters."""

    name = "rkd"

    def __init__(self, student_layer: str, teacher_layer: str, w_dist: float = 1.0, w_angle: float = 2.0) -> None:
        super().__init__()
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.w_dist, self.w_angle = w_dist, w_angle

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...], *,
                    student_layer: str | None = None, teacher_layer: str | None = None,
                    w_dist: float = 1.0, w_angle: float = 2.0) -> RKD:
        """Layers default to each model's last feature layer, the penultimate embedding."""
        student_layer = student_layer or list(stage_shapes(student, input_shape))[-1]
        teacher_layer = teacher_layer or list(stage_shapes(teacher, input_shape))[-1]
        layer_shape(student, input_shape, student_layer)  # a misspelt name fails here, not mid-training
        layer_shape(teacher, input_shape, teacher_layer)
        return cls(student_layer, teacher_layer, w_dist, w_angle)

    def forward(self, student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted RKD distance + angle loss of the two embeddings."""
        return rkd_loss(student_feats[self.student_layers[0]], teacher_feats[self.teacher_layers[0]],
                        self.w_dist, self.w_angle)
