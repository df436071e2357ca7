"""Load one `.npy` feature file per sample into a single contiguous float32 array, checking each file."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtrack.errors import DataError

_NUMERIC_KINDS = "biuf"  # bool, int, uint, float; complex, object and strings are refused
_MISSING_SHOWN = 3


@dataclass(frozen=True)
class FeatureFile:
    index: int  # entry number in the manifest, for error messages
    sample_id: str  # the relative posix path as the manifest gives it, normalised
    path: Path  # resolved location, already checked to lie under the data root

    def describe(self) -> str:
        """How error messages name this file: its manifest entry number and path."""
        return f"manifest entry {self.index} ({self.sample_id!r})"


def load_feature_files(files: Sequence[FeatureFile], root: Path) -> np.ndarray:
    """Array (N, *shape) float32 from the files in order; refuses duplicates, missing files, mixed shapes, NaN/Inf."""
    if not files:
        raise DataError("the manifest lists no samples", 'add entries to "samples"')
    _check_duplicates(files)
    _check_present(files, root)
    out: np.ndarray | None = None
    first: FeatureFile = files[0]
    for row, f in enumerate(files):
        arr = _read(f)
        if out is None:
            out = np.empty((len(files), *arr.shape), dtype=np.float32)
        elif arr.shape != out.shape[1:]:
            raise DataError(f"{f.describe()} has feature shape {arr.shape} but {first.describe()} has {out.shape[1:]}",
                            "save every sample with the same shape")
        out[row] = arr
        if not np.isfinite(out[row]).all():
            raise DataError(f"{f.describe()} contains NaN or Inf feature values",
                            "clean or drop that sample; training on it would make the loss non-finite")
    assert out is not None
    return out


def _check_duplicates(files: Sequence[FeatureFile]) -> None:
    seen: dict[str, FeatureFile] = {}
    for f in files:
        if f.sample_id in seen:
            raise DataError(f"duplicate file entry: {seen[f.sample_id].describe()} and manifest entry {f.index} "
                            "name the same file", "list every file once")
        seen[f.sample_id] = f


def _check_present(files: Sequence[FeatureFile], root: Path) -> None:
    missing = [f for f in files if not f.path.is_file()]
    if missing:
        shown = ", ".join(f.describe() for f in missing[:_MISSING_SHOWN])
        more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        raise DataError(f"{len(missing)} of {len(files)} feature files are missing under data root {root}: "
                        f"{shown}{more}",
                        "check data.root (default: the manifest's folder) or remove those entries")


def _read(f: FeatureFile) -> np.ndarray:
    try:
        arr = np.load(f.path, allow_pickle=False)  # never unpickle: a manifest must not be able to run code
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{f.describe()} is not a readable .npy array ({exc})",
                        "write it with numpy.save(path, array)") from exc
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{f.describe()} is an .npz archive, not a single .npy array",
                        "save one array per file with numpy.save")
    if arr.dtype.kind not in _NUMERIC_KINDS or arr.ndim == 0:
        raise DataError(f"{f.describe()} holds a {arr.dtype} array of shape {arr.shape}",
                        "save a numeric array with at least one dimension")
    return arr
