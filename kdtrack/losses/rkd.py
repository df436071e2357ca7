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
# A pair closer than this share of the batch's mean distance is one point for relational purposes: a triplet on
# it has no angle (normalising a ~0 difference has a ~1/eps gradient), so it is left out, as is the pair itself.
_REL_TOL = 1e-3


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances from explicit differences (exact near 0, unlike the Gram form), in
    O(B²) memory; equal rows give a zero distance and a zero gradient."""
    return torch.cdist(e[None], e[None], compute_mode="donot_use_mm_for_euclid_dist")[0]


def _edges(d: torch.Tensor) -> torch.Tensor:
    """(B, B) distances -> (B, B) bool: pairs i != j longer than the tolerance (relative to the mean over i != j)."""
    batch = d.shape[0]
    with torch.no_grad():
        scale = d.sum() / (batch * (batch - 1))  # the diagonal is exactly 0
        return (d > _REL_TOL * scale) & ~torch.eye(batch, dtype=torch.bool, device=d.device)


def _valid_pairs(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher distances, and the pairs that are an edge in both."""
    ds, dt = _pairwise_distances(s), _pairwise_distances(t)
    return ds, dt, _edges(ds) & _edges(dt)


def rkd_distance_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between student and teacher pairwise distances, each divided by its own mean over the pairs used.

    Pairs of (near-)equal embeddings in either model are left out. Embeddings are flattened to (B, D); dimensions
    may differ between the two. Zero for B < 2 or when no pair is left.
    """
    s, t = upcast(student_emb.flatten(1)), upcast(teacher_emb.detach().flatten(1))
    if s.shape[0] < 2:
        return s.sum() * 0.0
    ds, dt, valid = _valid_pairs(s, t)
    # Masked means rather than boolean indexing: no host sync, and a masked pair gets exactly zero gradient.
    w = valid.to(s.dtype)
    n = w.sum().clamp(min=1.0)
    mean_s, mean_t = ((ds * w).sum() / n).clamp(min=_EPS), ((dt * w).sum() / n).clamp(min=_EPS)
    return (F.smooth_l1_loss(ds / mean_s, dt / mean_t, reduction="none") * w).sum() / n


def _angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, B): entry [j, i, k] is the cosine of the angle at e_j between e_i and e_k."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, D): [j, i] = unit(e_i - e_j)
    return unit @ unit.transpose(1, 2)


def rkd_angle_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between student and teacher angle cosines over all ordered triplets of distinct samples.

    A triplet with an edge of (near-)equal embeddings in either model is left out. Embeddings are flattened to
    (B, D); zero for B < 3 or when no triplet is left. Memory is O(B² D + B³).
    """
    s, t = upcast(student_emb.flatten(1)), upcast(teacher_emb.detach().flatten(1))
    if s.shape[0] < 3:
        return s.sum() * 0.0
    _, _, edge = _valid_pairs(s.detach(), t)
    used = (edge[:, :, None] & edge[:, None, :] & edge[None, :, :]).to(s.dtype)  # [j, i, k]: edges j-i, j-k, i-k
    terms = F.smooth_l1_loss(_angles(s), _angles(t), reduction="none")  # (B, B, B)
    return (terms * used).sum() / used.sum().clamp(min=1.0)


def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, w_dist: float, w_angle: float) -> torch.Tensor:
    """w_dist · distance term + w_angle · angle term (paper: 25 and 50; see the module note)."""
    return w_dist * rkd_distance_loss(student_emb, teacher_emb) + w_angle * rkd_angle_loss(student_emb, teacher_emb)


class RKD(nn.Module):
    """RKD on one embedding layer per model (default: the penultimate one); no trainable parameters."""

    name = "rkd"

    def __init__(self, student_layer: str, teacher_layer: str, w_dist: float, w_angle: float) -> None:
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
