"""Re-split a dataset from a folder of `<split>_indices.json` files, each a JSON list of row indices."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdtrack.data.dataset import IndexedDataset
from kdtrack.errors import DataError

SUFFIX = "_indices.json"  # <split>_indices.json


def apply_index_splits(ds: IndexedDataset, folder: str | Path) -> IndexedDataset:
    """Only the listed rows of `ds`, in ascending row order, each in the split its file is named after."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"index-split folder {folder} not found",
                        f"set data.index_splits to a folder of <split>{SUFFIX} files, "
                        "or to '' to keep the source splits")
    files = sorted(folder.glob(f"*{SUFFIX}"))
    if not files:
        raise DataError(f"index-split folder {folder} has no *{SUFFIX} files",
                        f"add e.g. train{SUFFIX} holding a JSON list of row indices")
    owner = np.full(len(ds), -1, dtype=np.int64)  # which file claims each row
    names: list[str] = []
    for k, path in enumerate(files):
        split = path.name[: -len(SUFFIX)]
        if not split:
            raise DataError(f"index-split file {path} has no split name", f"name it <split>{SUFFIX}, e.g. val{SUFFIX}")
        rows = read_index_file(path, len(ds))
        _claim(owner, rows, k, files, ds)
        names.append(split)
    keep = np.flatnonzero(owner >= 0)
    return ds.take(keep).with_splits(np.array(names)[owner[keep]])


def read_index_file(path: Path, n: int) -> np.ndarray:
    """Row indices listed in one `<split>_indices.json` file, checked against a dataset of n rows."""
    if not path.is_file():
        raise DataError(f"index-split file {path} not found", "check the path of the <split>_indices.json file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"index-split file {path} is not valid JSON ({exc})",
                        "write it as a JSON list of row indices") from exc
    if not isinstance(values, list):
        raise DataError(f"index-split file {path} holds a {type(values).__name__}",
                        "write it as a JSON list, e.g. [0, 5, 7]")
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise DataError(f"index-split file {path} has non-integer entry {bad[0]!r}", "list integer row indices only")
    rows = np.array(values, dtype=np.int64)
    out = np.flatnonzero((rows < 0) | (rows >= n))
    if out.size:
        raise DataError(f"index-split file {path} has index {int(rows[out[0]])} out of range for a dataset of {n} rows",
                        f"use row indices 0..{n - 1} of the source dataset")
    uniq, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"index-split file {path} lists row {int(uniq[counts > 1][0])} more than once",
                        "list each row once")
    return rows


def _claim(owner: np.ndarray, rows: np.ndarray, k: int, files: list[Path], ds: IndexedDataset) -> None:
    taken = rows[owner[rows] >= 0]
    if taken.size:
        r = int(taken[0])
        raise DataError(f"row {r} ({ds.sample_ids[r]}) is in two index-split files: {files[int(owner[r])].name} "
                        f"and {files[k].name}", "put every row in at most one split")
    owner[rows] = k
