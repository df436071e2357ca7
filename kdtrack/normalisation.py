"""Input standardisation `(x - mean) / std`: one mean and std, or one per channel. A module of its own (torch and
numpy only), so that an MLflow model of a checkpoint normalises exactly as training did without kdtrack.data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdtrack.errors import DataError


@dataclass(frozen=True)
class Normalisation:
    """Standardisation `(x - mean) / std`, stored as plain floats so checkpoints load weights-only: one mean and std
    for every value (what kdtrack fits), or one per channel, the first axis of a sample (a teacher from elsewhere,
    e.g. ImageNet's per-channel statistics)."""

    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]

    def to_dict(self) -> dict[str, float | list[float]]:
        """`{"mean": float, "std": float}`, or lists of floats per channel."""
        if isinstance(self.mean, tuple):
            return {"mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        """Inverse of `to_dict`; a missing key, a non-positive std or per-channel lists of different lengths are
        refused."""
        try:
            channels = isinstance(d["mean"], (list, tuple))
            mean, std = ((tuple(map(float, d["mean"])), tuple(map(float, d["std"]))) if channels
                         else (float(d["mean"]), float(d["std"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"normalisation {d!r} is not of the form {{'mean': float, 'std': float}} (or lists of "
                            "floats per channel)", "save it with Normalisation.to_dict()") from exc
        if channels and (len(mean) != len(std) or not mean):
            raise DataError(f"normalisation {d!r} needs one mean and one std per channel",
                            "give as many stds as means")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and np.min(std) > 0):
            raise DataError(f"normalisation {d!r} needs a finite mean and a positive std",
                            "refit it with fit_normalisation on the training split")
        return cls(mean, std)

    def terms(self, sample_rank: int) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """`(mean, 1/std)` that broadcast against samples of rank `sample_rank`, alone or in a batch."""
        if not isinstance(self.mean, tuple):
            return self.mean, 1.0 / self.std
        shape = (len(self.mean),) + (1,) * (sample_rank - 1)  # channels first, then the sample's other axes
        return (torch.tensor(self.mean).view(shape),
                torch.tensor([1.0 / s for s in self.std]).view(shape))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised copy of one sample `x` (channels on its first axis)."""
        mean, scale = self.terms(x.dim())
        return (x - mean) * scale
