"""IndexedDataset: rows of (x, y, row, domain), each with a stable sample_id and a split name."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdtrack.errors import DataError

UNLABELED = -1  # label of a sample whose class is unknown (split `unlabeled`)
_STD_FLOOR = 1e-8
_STAT_CHUNK_ROWS = 65536  # bounds the float64 temporaries of fit_normalisation


@dataclass(frozen=True)
class Normalisation:
    """Scalar standardisation `(x - mean) / std`, stored as plain floats so checkpoints load weights-only."""

    mean: float
    std: float

    def to_dict(self) -> dict[str, float]:
        """`{"mean": float, "std": float}` with plain Python floats."""
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        """Inverse of `to_dict`; a missing key or a non-positive std is refused."""
        try:
            mean, std = float(d["mean"]), float(d["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"normalisation {d!r} is not of the form {{'mean': float, 'std': float}}",
                            "save it with Normalisation.to_dict()") from exc
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise DataError(f"normalisation {d!r} needs a finite mean and a positive std",
                            "refit it with fit_normalisation on the training split")
        return cls(mean, std)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised copy of `x` (any shape)."""
        return (x - self.mean) * (1.0 / self.std)


def fit_normalisation(ds: IndexedDataset) -> Normalisation:
    """Scalar mean/std over all raw feature values of `ds`; pass `ds.select(["train"])` to avoid leakage."""
    flat = ds.features.reshape(len(ds), -1)
    if flat.size == 0:
        raise DataError("cannot fit a normalisation on an empty dataset", "select a split that has samples")
    mean = float(flat.mean(dtype=np.float64))
    sq = 0.0
    for start in range(0, len(flat), _STAT_CHUNK_ROWS):
        block = flat[start:start + _STAT_CHUNK_ROWS].astype(np.float64) - mean
        sq += float(np.einsum("ij,ij->", block, block))
    std = (sq / flat.size) ** 0.5
    # a constant input would otherwise be divided by ~0 and blow up to inf
    return Normalisation(mean, std if std > _STD_FLOOR else 1.0)


class IndexedDataset(Dataset):
    """In-memory samples; `ds[i]` is `(x, y, i, domain_index)` with x normalised when `normalisation` is set."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        sample_ids: Sequence[str],
        splits: np.ndarray,
        domains: np.ndarray,
        num_classes: int,
        source: str,
        attributes: dict[str, np.ndarray] | None = None,
        normalisation: Normalisation | None = None,
    ) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if not features.flags.writeable:
            features = features.copy()  # torch.from_numpy needs a writeable buffer
        n = len(features)
        self.features = features
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.sample_ids = list(sample_ids)
        self.splits = np.asarray(splits, dtype=str)
        self.domains = np.asarray(domains, dtype=str)
        self.attributes = {k: np.asarray(v) for k, v in (attributes or {}).items()}
        self.num_classes = int(num_classes)
        self.source = source
        self.normalisation = normalisation
        self._check(n)
        names, domain_index = np.unique(self.domains, return_inverse=True)
        self.domain_names: list[str] = [str(s) for s in names]
        self._domain_index = domain_index.astype(np.int64).reshape(-1)
        self._bind_tensors()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 8, 8)."""
        return tuple(int(d) for d in self.features.shape[1:])

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        x = self._x[i]
        if self.normalisation is not None:
            x = self.normalisation.apply(x)
        return x, self._y[i], i, self._d[i]

    def select(self, splits: Iterable[str]) -> IndexedDataset:
        """Rows of the named splits in original order, renumbered 0..n-1; sample ids are kept."""
        wanted = [splits] if isinstance(splits, str) else list(splits)
        present = sorted(set(self.splits.tolist()))
        unknown = [s for s in wanted if s not in present]
        if unknown:
            raise DataError(f"split {unknown[0]!r} is not in this {self.source} dataset",
                            f"choose from the splits present: {', '.join(present)}")
        return self.take(np.flatnonzero(np.isin(self.splits, wanted)))

    def take(self, rows: np.ndarray) -> IndexedDataset:
        """The given rows (int indices, in the order given) as a new dataset; sample ids are kept."""
        rows = np.asarray(rows, dtype=np.int64)
        return IndexedDataset(
            features=self.features[rows],
            labels=self.labels[rows],
            sample_ids=[self.sample_ids[r] for r in rows.tolist()],
            splits=self.splits[rows],
            domains=self.domains[rows],
            num_classes=self.num_classes,
            source=self.source,
            attributes={k: v[rows] for k, v in self.attributes.items()},
            normalisation=self.normalisation,
        )

    def with_splits(self, splits: np.ndarray) -> IndexedDataset:
        """Same rows with the split names replaced (arrays other than splits are shared)."""
        splits = np.asarray(splits, dtype=str)
        if splits.shape != (len(self),):
            raise DataError(f"{splits.shape[0] if splits.ndim else 0} split names for {len(self)} rows",
                            "give exactly one split name per row")
        other = copy.copy(self)
        other.splits = splits
        return other

    def with_normalisation(self, norm: Normalisation | None) -> IndexedDataset:
        """Same rows (arrays shared) whose items are normalised by `norm` (None: raw features)."""
        other = copy.copy(self)
        other.normalisation = norm
        return other

    def split_counts(self) -> dict[str, int]:
        """Rows per split name, e.g. {"test": 269, "train": 1259, "val": 269}."""
        names, counts = np.unique(self.splits, return_counts=True)
        return {str(s): int(c) for s, c in zip(names, counts)}

    def batch(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(x[B, ...], y[B], row[B], domain[B])` for many rows at once; equal to collating `ds[r]` for r in rows."""
        index = torch.as_tensor(rows, dtype=torch.int64)
        x = self._x.index_select(0, index)
        if self.normalisation is not None:
            x.sub_(self.normalisation.mean).mul_(1.0 / self.normalisation.std)
        return x, self._y_t.index_select(0, index), index, self._d_t.index_select(0, index)

    def __repr__(self) -> str:
        return (f"IndexedDataset(source={self.source!r}, rows={len(self)}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, splits={self.split_counts()})")

    def __getstate__(self) -> dict[str, Any]:
        # the tensors are views of the numpy arrays; pickling both would ship the data twice to workers
        state = self.__dict__.copy()
        for key in ("_x", "_y", "_d", "_y_t", "_d_t"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind_tensors()

    def _bind_tensors(self) -> None:
        self._x = torch.from_numpy(self.features)
        self._y_t = torch.from_numpy(self.labels)
        self._d_t = torch.from_numpy(self._domain_index)
        # plain lists: indexing one is several times cheaper than a numpy scalar -> int on the hot path
        self._y: list[int] = self.labels.tolist()
        self._d: list[int] = self._domain_index.tolist()

    def _check(self, n: int) -> None:
        if self.features.ndim < 2:
            raise DataError(f"features have shape {self.features.shape}, need (N, *input_shape)",
                            "stack one array per sample along a new first axis")
        lengths = {"labels": len(self.labels), "sample_ids": len(self.sample_ids), "splits": len(self.splits),
                   "domains": len(self.domains), **{k: len(v) for k, v in self.attributes.items()}}
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise DataError(f"{n} feature rows but lengths {wrong}", "give one entry per sample in every array")
        if self.num_classes < 1:
            raise DataError(f"num_classes is {self.num_classes}", "set it to the number of classes (>= 1)")
        bad = np.flatnonzero((self.labels < UNLABELED) | (self.labels >= self.num_classes))
        if bad.size:
            r = int(bad[0])
            raise DataError(f"row {r} ({self.sample_ids[r]}) has label {int(self.labels[r])}, "
                            f"outside 0..{self.num_classes - 1}",
                            f"use labels in 0..{self.num_classes - 1} or -1 for unlabelled")
        if len(set(self.sample_ids)) != n:
            seen: set[str] = set()
            dup = next(s for s in self.sample_ids if s in seen or seen.add(s))
            raise DataError(f"sample id {dup!r} appears more than once", "give every sample a unique id")
