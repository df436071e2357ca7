"""IndexedDataset: rows of (x, y, row, domain), each with a stable sample_id and a split name."""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdtrack.data.file_samples import FileSamples, check_reshape
from kdtrack.errors import DataError
from kdtrack.normalisation import Normalisation

UNLABELED = -1  # label of a sample whose class is unknown (split `unlabeled`)
_STD_FLOOR = 1e-8
_STAT_CHUNK_ROWS = 65536  # bounds the float64 temporaries of fit_normalisation


def fit_normalisation(ds: IndexedDataset) -> Normalisation:
    """Scalar mean/std over all raw feature values of `ds`; pass `ds.select(["train"])` to avoid leakage."""
    if len(ds) == 0 or math.prod(ds.input_shape) == 0:
        raise DataError("cannot fit a normalisation on an empty dataset", "select a split that has samples")
    if isinstance(ds.storage, FileSamples):
        return _fit_from_moments(ds.storage.moments(), math.prod(ds.input_shape))
    flat = ds.features.reshape(len(ds), -1)
    mean = float(flat.mean(dtype=np.float64))
    sq = 0.0
    for start in range(0, len(flat), _STAT_CHUNK_ROWS):
        block = flat[start:start + _STAT_CHUNK_ROWS].astype(np.float64) - mean
        sq += float(np.einsum("ij,ij->", block, block))
    std = (sq / flat.size) ** 0.5
    # a constant input would otherwise be divided by ~0 and blow up to inf
    return Normalisation(mean, std if std > _STD_FLOOR else 1.0)


def _fit_from_moments(moments: np.ndarray, values_per_row: int) -> Normalisation:
    """Mean/std from each row's (sum, squared deviations from its own mean), read from the content-hash sidecar:
    no sample is loaded. Pooled as in Chan et al.'s parallel variance: sum of within-row plus between-row parts."""
    n = len(moments) * values_per_row
    mean = float(moments[:, 0].sum() / n)
    between = np.square(moments[:, 0] / values_per_row - mean).sum() * values_per_row
    std = float((moments[:, 1].sum() + between) / n) ** 0.5
    return Normalisation(mean, std if std > _STD_FLOOR else 1.0)


class IndexedDataset(Dataset):
    """Samples in memory (an array) or read on demand from files (a FileSamples index); `ds[i]` is
    `(x, y, i, domain_index)` with x normalised when `normalisation` is set."""

    def __init__(
        self,
        features: np.ndarray | FileSamples,
        labels: np.ndarray,
        sample_ids: Sequence[str],
        splits: np.ndarray,
        domains: np.ndarray,
        num_classes: int,
        source: str,
        attributes: dict[str, np.ndarray] | None = None,
        normalisation: Normalisation | None = None,
    ) -> None:
        if not isinstance(features, FileSamples):
            features = np.ascontiguousarray(features, dtype=np.float32)
            if not features.flags.writeable:
                features = features.copy()  # torch.from_numpy needs a writeable buffer
        n = len(features)
        self.storage = features
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
        if isinstance(self.storage, FileSamples):
            return self.storage.shape
        return tuple(int(d) for d in self.storage.shape[1:])

    @property
    def lazy(self) -> bool:
        """True when samples are read from files on demand."""
        return isinstance(self.storage, FileSamples)

    @property
    def features(self) -> np.ndarray:
        """All raw samples (N, *input_shape) float32; a lazy dataset reads every file for it, so code that may
        meet large data uses `arrays(rows)` or `batch(rows)` instead."""
        return self.arrays(np.arange(len(self))) if isinstance(self.storage, FileSamples) else self.storage

    def arrays(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw (unnormalised) samples of `rows` as a float32 array (B, *input_shape)."""
        if isinstance(self.storage, FileSamples):
            return self.storage.read(rows)
        return self.storage[np.asarray(rows, dtype=np.int64)]

    def content_hashes(self, recompute: bool = False) -> np.ndarray:
        """sha256 of each row's raw float32 values, (N, 32) uint8; a lazy dataset takes them from its sidecar for
        files whose size and mtime are unchanged, unless `recompute`."""
        if isinstance(self.storage, FileSamples):
            return self.storage.content_hashes(recompute)
        flat = np.ascontiguousarray(self.storage, dtype="<f4").reshape(len(self), -1).view(np.uint8)
        out = np.empty((len(self), 32), dtype=np.uint8)
        for i in range(len(self)):
            out[i] = np.frombuffer(hashlib.sha256(flat[i]).digest(), dtype=np.uint8)
        return out

    def reshaped(self, shape: Sequence[int]) -> IndexedDataset:
        """Same rows whose samples are read as `shape` (as many values as today's shape)."""
        shape = tuple(int(d) for d in shape)
        other = copy.copy(self)
        if isinstance(self.storage, FileSamples):
            other.storage = self.storage.reshaped(shape)
        else:
            check_reshape(shape, self.input_shape)
            other.storage = self.storage.reshape(len(self), *shape)
        other._bind_tensors()
        return other

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        x = torch.from_numpy(self.storage.read([i])[0]) if self._x is None else self._x[i]
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
            features=self.storage.take(rows) if isinstance(self.storage, FileSamples) else self.storage[rows],
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
        x = torch.from_numpy(self.storage.read(index.numpy())) if self._x is None else self._x.index_select(0, index)
        if self.normalisation is not None:
            mean, scale = self.normalisation.terms(len(self.input_shape))
            x.sub_(mean).mul_(scale)
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
        self._x = None if isinstance(self.storage, FileSamples) else torch.from_numpy(self.storage)
        self._y_t = torch.from_numpy(self.labels)
        self._d_t = torch.from_numpy(self._domain_index)
        # plain lists: indexing one is several times cheaper than a numpy scalar -> int on the hot path
        self._y: list[int] = self.labels.tolist()
        self._d: list[int] = self._domain_index.tolist()

    def _check(self, n: int) -> None:
        if isinstance(self.storage, np.ndarray) and self.storage.ndim < 2:
            raise DataError(f"features have shape {self.storage.shape}, need (N, *input_shape)",
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
