"""Lazy, file-backed samples: the dataset keeps an index of files and reads rows on demand (in DataLoader workers
when `data.num_workers` > 0), so memory holds the index, not the data."""
from __future__ import annotations

import math
from collections.abc import Sequence
import numpy as np

from kdtrack.data.content_hashes import Facts, Sidecar, facts_of, rehash_forced
from kdtrack.data.feature_files import FeatureFile, load_checked
from kdtrack.errors import DataError


def check_reshape(shape: tuple[int, ...], stored: tuple[int, ...]) -> None:
    """Refuse reading samples of shape `stored` as `shape` unless both hold the same number of values."""
    if math.prod(shape) != math.prod(stored) or not shape or min(shape) < 1:
        raise DataError(f"data.input_shape {list(shape)} holds {math.prod(shape)} values but the samples have "
                        f"shape {list(stored)} ({math.prod(stored)} values)",
                        f"set data.input_shape to a shape of {math.prod(stored)} values, or to [] to keep the "
                        "stored shape")


class FileTable:
    """The sample files of one manifest, in manifest order: where they are, their (size, mtime) when listed, and
    (computed once per process, through the sidecar) each file's facts."""

    def __init__(self, files: Sequence[FeatureFile], stats: np.ndarray, shape: tuple[int, ...],
                 sidecar: Sidecar) -> None:
        self.ids = [f.sample_id for f in files]
        self.entries = np.array([f.index for f in files], dtype=np.int64)
        self.paths = [f.path for f in files]
        self.stats = stats  # (N, 2) int64: size, mtime_ns
        self.shape = shape  # every file's shape: the first file's
        self.sidecar = sidecar
        self._hashes: np.ndarray | None = None  # (N, 32) uint8
        self._moments: np.ndarray | None = None  # (N, 2) float64: sum, squared deviations from the file's mean
        self._fresh = False  # facts re-read from every file in this process

    def file(self, i: int) -> FeatureFile:
        return FeatureFile(int(self.entries[i]), self.ids[i], self.paths[i])

    def load(self, i: int) -> np.ndarray:
        """File i as float32 of the table's shape, checked."""
        return load_checked(self.file(i), self.shape, self.file(0))

    def facts(self, recompute: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`(hashes (N, 32) uint8, moments (N, 2) float64)`; files whose size or mtime match the sidecar are not
        read, unless `recompute` (or KDTRACK_REHASH=1) asks for every file to be read again."""
        recompute = recompute or rehash_forced()
        if self._hashes is not None and self._moments is not None and (self._fresh or not recompute):
            return self._hashes, self._moments
        known = {} if recompute else self.sidecar.load()
        current: dict[str, Facts] = {}
        read = 0
        for i, (sid, size, mtime) in enumerate(zip(self.ids, *self.stats.T.tolist())):
            facts = known.get(sid)
            if facts is None or (facts.size, facts.mtime_ns) != (size, mtime):
                facts, read = facts_of(self.load(i), size, mtime), read + 1
            elif facts.shape != self.shape:
                raise DataError(f"{self.file(i).describe()} has feature shape {facts.shape} but "
                                f"{self.file(0).describe()} has {self.shape}", "save every sample with the same shape")
            current[sid] = facts
        if read or len(known) != len(current):
            self.sidecar.save(current)
        hashes = np.frombuffer(b"".join(f.sha256 for f in current.values()), dtype=np.uint8).reshape(-1, 32)
        moments = np.array([(f.total, f.sq_dev) for f in current.values()], dtype=np.float64).reshape(-1, 2)
        self._hashes, self._moments, self._fresh = hashes, moments, recompute or self._fresh
        return hashes, moments

    def __getstate__(self) -> dict:
        # workers only read files; the facts stay with the main process
        return {**self.__dict__, "_hashes": None, "_moments": None, "_fresh": False}


class FileSamples:
    """Rows of a FileTable (any subset, any order), each read as float32 of `shape` (the files' own shape, or a
    reshape of the same number of values)."""

    def __init__(self, table: FileTable, index: np.ndarray, shape: tuple[int, ...]) -> None:
        self.table = table
        self.index = np.asarray(index, dtype=np.int64)
        self.shape = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Array (B, *shape) float32 of the given rows, read from their files now."""
        picks = self.index[np.asarray(rows, dtype=np.int64)]
        out = np.empty((len(picks), *self.shape), dtype=np.float32)
        for k, i in enumerate(picks.tolist()):
            out[k] = self.table.load(i).reshape(self.shape)
        return out

    def take(self, rows: np.ndarray) -> FileSamples:
        return FileSamples(self.table, self.index[np.asarray(rows, dtype=np.int64)], self.shape)

    def reshaped(self, shape: tuple[int, ...]) -> FileSamples:
        """The same rows read as `shape`, which must hold as many values as the stored samples."""
        check_reshape(shape, self.table.shape)
        return FileSamples(self.table, self.index, shape)

    def content_hashes(self, recompute: bool = False) -> np.ndarray:
        """sha256 of each row's float32 values, (B, 32) uint8."""
        return self.table.facts(recompute)[0][self.index]

    def moments(self) -> np.ndarray:
        """(sum, squared deviations from the row's own mean) per row, (B, 2) float64."""
        return self.table.facts()[1][self.index]

    @staticmethod
    def concat(parts: Sequence[FileSamples]) -> FileSamples:
        """Rows of several views of one table, one after the other."""
        first = parts[0]
        if any(p.table is not first.table or p.shape != first.shape for p in parts):
            raise DataError("cannot join rows of different file-backed datasets", "take every part from one dataset")
        return FileSamples(first.table, np.concatenate([p.index for p in parts]), first.shape)
