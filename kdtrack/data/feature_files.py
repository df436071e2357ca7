"""The sample files a manifest names: located in bulk (one directory listing per folder, not one lookup per file),
then read one by one, each checked for shape and finite values."""
from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtrack.data.readers import read_sample
from kdtrack.errors import DataError

_MISSING_SHOWN = 3


@dataclass(frozen=True)
class FeatureFile:
    index: int  # entry number in the manifest, for error messages
    sample_id: str  # the relative posix path as the manifest gives it, normalised
    path: str  # location under the data root (checked to stay under it by `locate`)

    def describe(self) -> str:
        """How error messages name this file: its manifest entry number and path."""
        return f"manifest entry {self.index} ({self.sample_id!r})"


def locate(files: Sequence[FeatureFile], root: Path, real_root: Path) -> np.ndarray:
    """(size, mtime_ns) per file, int64 (N, 2); refuses duplicates, missing files and symlinks leading out of the
    root. Each folder is listed once and each folder resolved once, so 60,000 files cost a few folder reads."""
    if not files:
        raise DataError("the manifest lists no samples", 'add entries to "samples"')
    _check_duplicates(files)
    by_folder: dict[str, list[int]] = {}
    for k, f in enumerate(files):
        by_folder.setdefault(posixpath.dirname(f.sample_id), []).append(k)
    stats = np.zeros((len(files), 2), dtype=np.int64)
    missing: list[int] = []
    for folder, members in by_folder.items():
        listing = _listing(real_root / folder, files[members[0]], real_root)
        for k in members:
            entry = listing.get(posixpath.basename(files[k].sample_id))
            if entry is not None and entry.is_symlink() and not Path(entry.path).resolve().is_relative_to(real_root):
                raise _outside(files[k], real_root)
            if entry is None or not entry.is_file():
                missing.append(k)
                continue
            st = entry.stat()
            stats[k] = (st.st_size, st.st_mtime_ns)
    if missing:
        missing.sort()
        shown = ", ".join(files[k].describe() for k in missing[:_MISSING_SHOWN])
        more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        raise DataError(f"{len(missing)} of {len(files)} feature files are missing under data root {root}: "
                        f"{shown}{more}",
                        "check data.root (default: the manifest's folder) or remove those entries")
    return stats


def load_checked(f: FeatureFile, shape: tuple[int, ...] | None, first: FeatureFile) -> np.ndarray:
    """One sample as float32, refused when its shape differs from `shape` (the first file's) or it holds NaN/Inf."""
    arr = read_sample(f.path, f.describe())
    if shape is not None and arr.shape != shape:
        raise DataError(f"{f.describe()} has feature shape {arr.shape} but {first.describe()} has {shape}",
                        "save every sample with the same shape")
    out = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{f.describe()} contains NaN or Inf feature values",
                        "clean or drop that sample; training on it would make the loss non-finite")
    return out


def load_feature_files(files: Sequence[FeatureFile]) -> np.ndarray:
    """Array (N, *shape) float32 of every file in order (the eager form of a manifest)."""
    first = load_checked(files[0], None, files[0])
    out = np.empty((len(files), *first.shape), dtype=np.float32)
    out[0] = first
    for row in range(1, len(files)):
        out[row] = load_checked(files[row], first.shape, files[0])
    return out


def _listing(folder: Path, example: FeatureFile, real_root: Path) -> dict[str, os.DirEntry]:
    if not folder.resolve().is_relative_to(real_root):  # a symlinked folder leading out of the root
        raise _outside(example, real_root)
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def _outside(f: FeatureFile, real_root: Path) -> DataError:
    return DataError(f"{f.describe()} points outside the data root {real_root}",
                     "keep every file (and any symlink's target) under the data root")


def _check_duplicates(files: Sequence[FeatureFile]) -> None:
    seen: dict[str, FeatureFile] = {}
    for f in files:
        if f.sample_id in seen:
            raise DataError(f"duplicate file entry: {seen[f.sample_id].describe()} and manifest entry {f.index} "
                            "name the same file", "list every file once")
        seen[f.sample_id] = f
