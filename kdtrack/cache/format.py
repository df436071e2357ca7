"""The logit-cache schema (`kdtrack.logits/2`): cache key, store creation, opening, chunk geometry, completion.

A store is a Zarr v3 group. Every array is chunked along rows by `chunk_rows` and every chunk object carries a
CRC32C checksum, so a flipped byte fails the read. `chunk_done` keeps one object per flag, so writers owning
different chunks never write the same object. Remote artifact stores get a copy packed into shards (pack.py).
Every array names its dimensions (Zarr v3 `dimension_names`, which xarray needs), and the sample ids are stored
twice: as strings (`sample_ids`, zarr-python's extension type) and as core-spec bytes (`sample_ids_utf8`, ids.py).

A store is created whole in a hidden sibling folder and renamed into place, so a process killed at any moment leaves
at `path` either nothing or a fully created store (and at worst a stale sibling, removed by the next creation).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from kdtrack import __version__
from kdtrack.cache.ids import encode_ids, id_width
from kdtrack.errors import BadInput, CacheError

FORMAT = "kdtrack.logits/2"  # /2: dimension_names on every array, ids also as core-spec bytes (sample_ids_utf8)
STORAGE_DTYPES = ("float16", "float32")
ARRAYS = ("logits", "sample_ids", "sample_ids_utf8", "labels", "chunk_done")
# Attributes the caller supplies; `create_store` derives all the others from the data it is given.
CALLER_ATTRS = ("teacher_run_id", "checkpoint_sha256", "dataset_digest", "cache_key", "splits",
                "normalisation", "model_spec")
DERIVED_ATTRS = ("format", "num_classes", "output_shape", "dtype", "chunk_rows", "num_rows", "complete",
                 "initialised", "created_at", "kdtrack_version", "fidelity")
LABEL_FILL = -2  # below every valid label (-1 = unlabelled), so a removed labels object reads as invalid
_TARGET_CHUNK_BYTES = 4 << 20  # ~4 MiB of logits per chunk: few objects, cheap to rewrite one
MAX_CHUNK_BYTES = 256 << 20  # an explicit chunk_rows may not give more logits per chunk (unless one row is more)
_ROW_QUANTUM = 256


def cache_key(
    *,
    checkpoint_sha256: str,
    dataset_digest: str,
    splits: Sequence[str],
    dtype: str,
    output_shape: Sequence[int],
    normalisation: Mapping[str, float] | None,
    topk: int | None = None,
    views: Mapping[str, Any] | None = None,
) -> str:
    """sha256 hex of a canonical JSON of everything that decides the cached numbers, FORMAT included (and, for a
    cache of augmented views, the views: count, seed and ops)."""
    _check_dtype(dtype)
    identity = {
        "format": FORMAT,
        "checkpoint_sha256": checkpoint_sha256,
        "dataset_digest": dataset_digest,
        "splits": sorted(str(s) for s in splits),  # the dataset digest already fixes the row order
        "dtype": dtype,
        "output_shape": [int(d) for d in output_shape],
        "normalisation": None if normalisation is None else {k: [float(x) for x in v] if isinstance(v, (list, tuple))
                                                             else float(v) for k, v in normalisation.items()},
        "topk": None if topk is None else int(topk),
    }
    if views is not None:
        identity["views"] = {"count": int(views["count"]), "seed": int(views["seed"]), "ops": list(views["ops"])}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_chunk_rows(output_shape: Sequence[int], dtype: str) -> int:
    """Rows per chunk holding at most about 4 MiB of logits: a multiple of 256 when 256 rows fit, else as many
    whole rows as fit (at least one)."""
    row_bytes = max(_row_nbytes(output_shape, dtype), 1)
    rows = _TARGET_CHUNK_BYTES // row_bytes
    return rows // _ROW_QUANTUM * _ROW_QUANTUM if rows >= _ROW_QUANTUM else max(rows, 1)


def chunk_rows_for(num_rows: int, output_shape: Sequence[int], dtype: str, requested: int | None = None) -> int:
    """The chunk_rows a store of `num_rows` rows gets: `requested` (default ~4 MiB) capped at the row count, so a
    small store is never padded to a whole large chunk; BadInput when a requested chunk exceeds MAX_CHUNK_BYTES."""
    if requested is None:
        return max(min(default_chunk_rows(output_shape, dtype), num_rows), 1)
    row_bytes = _row_nbytes(output_shape, dtype)
    rows = min(int(requested), max(num_rows, 1))
    if rows > 1 and rows * row_bytes > MAX_CHUNK_BYTES:
        most = max(MAX_CHUNK_BYTES // max(row_bytes, 1), 1)
        raise BadInput(f"chunk_rows={requested} gives chunks of {rows * row_bytes:,} B of logits, more than "
                       f"{MAX_CHUNK_BYTES:,} B ({MAX_CHUNK_BYTES >> 20} MiB)",
                       f"use chunk_rows <= {most}, or 0 for about 4 MiB per chunk")
    return rows


def num_chunks(group_or_n: zarr.Group | int, chunk_rows: int | None = None) -> int:
    """Number of row chunks of a store, or of `n` rows cut into `chunk_rows`."""
    n, rows = _geometry(group_or_n, chunk_rows)
    return -(-n // rows)


def chunk_bounds(group_or_n: zarr.Group | int, chunk_rows: int | None, c: int) -> tuple[int, int]:
    """Rows `[start, stop)` of chunk `c` (the last chunk may be short); chunk_rows may be None for a group."""
    n, rows = _geometry(group_or_n, chunk_rows)
    if not 0 <= c < -(-n // rows):
        raise BadInput(f"chunk {c} does not exist in a store of {n} rows cut into chunks of {rows}",
                       f"use chunk indices 0..{-(-n // rows) - 1}")
    return c * rows, min((c + 1) * rows, n)


def create_store(
    path: str | Path,
    *,
    sample_ids: Sequence[str],
    labels: np.ndarray,
    output_shape: Sequence[int],
    dtype: str,
    chunk_rows: int,
    attrs: Mapping[str, Any],
) -> zarr.Group:
    """Create a new store at `path` (which must not exist): metadata, ids and labels, then `initialised=True`.

    The store is written in a hidden sibling folder and renamed to `path` whole. `attrs` must hold CALLER_ATTRS;
    the DERIVED_ATTRS are computed here from the other arguments. `chunk_rows` is capped at the row count.
    """
    path = Path(path)
    if path.exists():
        raise _path_exists(path)
    _check_dtype(dtype)
    n, shape = len(sample_ids), tuple(int(d) for d in output_shape)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,) or n == 0 or chunk_rows < 1:
        raise BadInput(f"{n} sample ids, labels of shape {labels.shape}, chunk_rows={chunk_rows}",
                       "give one label per sample id, at least one row, and chunk_rows >= 1")
    chunk_rows = chunk_rows_for(n, shape, dtype, chunk_rows)
    width = id_width(sample_ids)
    per_view = shape[1:] if attrs.get("views") else shape  # a cache of views: (K, *output) per row
    derived = {"format": FORMAT, "num_classes": per_view[0] if len(per_view) == 1 else None,
               "output_shape": list(shape),
               "dtype": dtype, "chunk_rows": int(chunk_rows), "num_rows": n, "complete": False, "initialised": False,
               "kdtrack_version": __version__, "fidelity": None,
               "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    _check_caller_attrs(attrs, derived["num_classes"])
    meta = {**attrs, **derived}  # derived keys in `attrs` (e.g. copied from an older store) are replaced
    _remove_stale_creations(path)
    with _creation_folder(path) as tmp:
        group = zarr.open_group(tmp, mode="w-", attributes=meta)
        _create_arrays(group, n, shape, dtype, chunk_rows, width, views=bool(attrs.get("views")))
        group["sample_ids"][:] = np.asarray(list(sample_ids), dtype=str)
        group["sample_ids_utf8"][:] = encode_ids(sample_ids, width)
        group["labels"][:] = labels
        group.update_attributes({"initialised": True})
        try:
            tmp.rename(path)  # replaces nothing but an empty folder: a non-empty `path` fails the rename
        except OSError as exc:
            raise _path_exists(path) from exc
    return zarr.open_group(path, mode="r+")


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open an initialised kdtrack cache (`mode` "r" or "r+"); CacheError if missing, foreign or half-created."""
    group = _open_any(path, mode)
    if group is None:
        raise CacheError(f"no logit cache at {path}", "build it with kdtrack cache-logits, or check the path")
    if not group.attrs.get("initialised", False):
        raise CacheError(f"the cache at {path} was never fully created (initialised is false)",
                         "rebuild it: kdtrack cache-logits rebuilds a half-created store")
    absent = [name for name in ARRAYS if name not in group]
    if absent:
        raise CacheError(f"the cache at {path} lacks the arrays {absent}", "rebuild it with kdtrack cache-logits")
    return group


def remove_store(path: str | Path) -> None:
    """Delete the store at `path`; refuses anything that is not a kdtrack cache (it never removes user data)."""
    if _open_any(path, "r") is not None:
        shutil.rmtree(path)


def is_store(path: str | Path) -> bool:
    """True when `path` holds a kdtrack cache of this format, initialised or not."""
    return _open_any(path, "r") is not None


def done_flags(group: zarr.Group) -> np.ndarray:
    """`chunk_done` as a bool array (num_chunks,); a flag object that cannot be read counts as not done."""
    flags = group["chunk_done"]
    try:
        return np.asarray(flags[:], dtype=bool)
    except (ValueError, OSError):
        # a torn or corrupt flag object: read flags one by one so one bad object costs one chunk, not all
        return np.array([_read_flag(flags, c) for c in range(flags.shape[0])], dtype=bool)


def mark_complete(group: zarr.Group, fidelity: Mapping[str, Any] | None) -> None:
    """Record the fidelity figures and set `complete=True`; refused while any chunk is not done."""
    pending = np.flatnonzero(~done_flags(group))
    if pending.size:
        raise CacheError(f"cannot mark the cache complete: {pending.size} chunk(s) not done, "
                         f"e.g. {pending[:5].tolist()}",
                         "finish the build (kdtrack cache-logits resumes it), then verify again")
    group.update_attributes({"fidelity": None if fidelity is None else dict(fidelity), "complete": True})


def mark_incomplete(group: zarr.Group) -> None:
    """Set `complete=False`, e.g. after a verification failed; readers then refuse the store."""
    group.update_attributes({"complete": False})


def store_nbytes(path: str | Path) -> int:
    """Bytes on disk of every file under `path` (a store, or one array folder inside it)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total


def _open_any(path: str | Path, mode: str) -> zarr.Group | None:
    """The group at `path` if it is a kdtrack cache of this format; None if nothing is there; CacheError otherwise."""
    if mode not in ("r", "r+"):
        raise BadInput(f"unknown store mode {mode!r}", "use 'r' to read or 'r+' to update")
    path = Path(path)
    if not path.exists():
        return None
    if not (path / "zarr.json").is_file():
        raise CacheError(f"{path} exists but is not a Zarr v3 store", "choose another cache path or move it away")
    try:
        group = zarr.open_group(path, mode=mode)
    except (ValueError, OSError, TypeError) as exc:
        raise CacheError(f"{path} is not a readable Zarr group: {exc}",
                         "choose another cache path or move it away") from exc
    found = group.attrs.get("format")
    if found != FORMAT:
        raise CacheError(f"{path} is not a kdtrack cache of format {FORMAT} (format attribute: {found!r})",
                         "choose another cache path, or rebuild with a kdtrack version that writes this format")
    return group


_CREATING = ".creating-"  # hidden sibling `.<name>.creating-<random>` in which a store is created


@contextlib.contextmanager
def _creation_folder(path: Path) -> Iterator[Path]:
    """A new hidden sibling of `path`, flock-ed while in use so that no other creation takes it for stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_CREATING}{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)  # releases the flock
        shutil.rmtree(tmp, ignore_errors=True)  # nothing is left there once renamed into place


def _remove_stale_creations(path: Path) -> None:
    """Remove the creation folders of `path` that no live process holds: what a killed creation left."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}{_CREATING}*"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue  # its creator finished or another cleaner was first
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(tmp, ignore_errors=True)
        except BlockingIOError:
            pass  # another process is creating this store right now
        finally:
            os.close(fd)


def _path_exists(path: Path) -> CacheError:
    return CacheError(f"cannot create a cache at {path}: the path exists",
                      "remove it with kdtrack.cache.remove_store, or choose another path")


def dimension_names(output_shape: Sequence[int], views: bool = False) -> dict[str, tuple[str, ...]]:
    """Zarr v3 `dimension_names` of each array: rows are `row`; a cache of augmented views has `view` next; class
    logits `class`, other outputs `output_<i>`."""
    per_view = tuple(output_shape[1:] if views else output_shape)
    outputs = ("class",) if len(per_view) == 1 else tuple(f"output_{i}" for i in range(len(per_view)))
    outputs = ("view", *outputs) if views else outputs
    return {"logits": ("row", *outputs), "sample_ids": ("row",), "sample_ids_utf8": ("row", "byte"),
            "labels": ("row",), "chunk_done": ("chunk",)}


def _create_arrays(group: zarr.Group, n: int, shape: tuple[int, ...], dtype: str, chunk_rows: int,
                   id_bytes: int, *, views: bool = False) -> None:
    raw, checksum, dims = BytesCodec(), [Crc32cCodec()], dimension_names(shape, views)
    # uncompressed bytes + CRC32C: corruption fails the read, and the size on disk is exact (README's formula)
    common = {"serializer": raw, "compressors": checksum}
    group.create_array("logits", shape=(n, *shape), chunks=(chunk_rows, *shape), dtype=dtype, **common,
                       fill_value=np.nan, dimension_names=dims["logits"])  # a removed object reads as NaN
    group.create_array("sample_ids", shape=(n,), chunks=(chunk_rows,), dtype=str, compressors=checksum,
                       dimension_names=dims["sample_ids"])
    group.create_array("sample_ids_utf8", shape=(n, id_bytes), chunks=(chunk_rows, id_bytes), dtype="uint8",
                       **common, fill_value=0, dimension_names=dims["sample_ids_utf8"])  # removed: empty ids
    group.create_array("labels", shape=(n,), chunks=(chunk_rows,), dtype="int64", **common,
                       fill_value=LABEL_FILL, dimension_names=dims["labels"])
    group.create_array("chunk_done", shape=(-(-n // chunk_rows),), chunks=(1,), dtype=bool, **common,
                       fill_value=False, dimension_names=dims["chunk_done"])


def _check_caller_attrs(attrs: Mapping[str, Any], num_classes: int | None) -> None:
    missing = [k for k in CALLER_ATTRS if k not in attrs]
    if missing:
        raise BadInput(f"cache attrs lack {missing}", f"pass every one of {list(CALLER_ATTRS)}")
    if attrs.get("num_classes", num_classes) != num_classes:
        raise BadInput(f"attrs say num_classes={attrs['num_classes']} but the teacher's output gives {num_classes}",
                       "leave num_classes out of attrs: it is derived from the output shape")


def _read_flag(flags: zarr.Array, c: int) -> bool:
    try:
        return bool(flags[c])
    except (ValueError, OSError):
        return False


def _geometry(group_or_n: zarr.Group | int, chunk_rows: int | None) -> tuple[int, int]:
    if isinstance(group_or_n, zarr.Group):
        n = int(group_or_n.attrs["num_rows"])
        chunk_rows = int(group_or_n.attrs["chunk_rows"]) if chunk_rows is None else chunk_rows
    else:
        n = int(group_or_n)
    if chunk_rows is None or chunk_rows < 1:
        raise BadInput(f"chunk_rows must be a positive int, got {chunk_rows!r}",
                       "e.g. default_chunk_rows(shape, dtype)")
    return n, int(chunk_rows)


def _row_nbytes(output_shape: Sequence[int], dtype: str) -> int:
    return math.prod(int(d) for d in output_shape) * np.dtype(_check_dtype(dtype)).itemsize


def _check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise BadInput(f"cache dtype {dtype!r} is not supported", f"use one of: {', '.join(STORAGE_DTYPES)}")
    return dtype
