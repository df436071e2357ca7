"""Pack a cache store into shards: same arrays, attributes and checksummed chunks, in a few objects per array.

A store built in place keeps one object per chunk, so a build resumes chunk by chunk and writers never share an
object. Uploading it through an HTTP artifact proxy costs one request per object, though, so remote caches are
uploaded packed: each array's chunks are grouped into shards of at most ~256 MiB with the Zarr v3 sharding codec.
Every inner chunk keeps its own codecs (CRC32C included) and the shard index carries a CRC32C too, so corruption
is still caught and named by chunk. A packed store reads like the original with plain zarr (shard keys such as
`logits/c.0.0`), and `build(..., chunks=[k], force_chunks=True)` still repairs it: zarr rewrites the shard holding
chunk k, keeping the stored bytes of its other chunks.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import zarr

from kdtrack.cache.format import open_store
from kdtrack.errors import CacheError

SHARD_BYTES = 256 << 20  # upper bound of one shard object, and of the rows one copy step holds in memory
_VLEN_PREFIX = 4  # bytes zarr's vlen-utf8 codec stores before each string
_ID_BLOCK = 1 << 20  # ids read at a time when measuring their size
# Shard keys like `c.0.0` keep each array one flat folder. With the usual `c/0/0`, MLflow's HTTP artifact listing
# takes the folder `c/0`, holding one file also named `0`, for that file itself, and never downloads the shard.
_FLAT_KEYS = {"name": "default", "separator": "."}


def pack(src: str | Path, dst: str | Path, *, shard_bytes: int = SHARD_BYTES) -> int:
    """Copy the cache at `src` into a new store at `dst` whose arrays are sharded; return the files written.

    Rows are copied one shard at a time, each shard in one assignment, so nothing is read back and rewritten.
    """
    source, dst = open_store(src), Path(dst)
    if dst.exists():
        raise CacheError(f"cannot pack {src} into {dst}: the path exists", "remove it first, or choose another path")
    attrs = dict(source.attrs)
    # `initialised` stays false until every array is copied, as create_store does, so an interrupted pack
    # can never pass for a usable store.
    target = zarr.open_group(dst, mode="w-", attributes={**attrs, "initialised": False})
    for name, array in source.arrays():
        _copy_sharded(array, target, name, src, shard_bytes)
    target.update_attributes(attrs)
    return sum(len(files) for _folder, _dirs, files in os.walk(dst))


def _shard_rows(array: zarr.Array, row_nbytes: float, limit: int) -> int:
    """Rows per shard: a whole number of `array`'s row chunks, at most `limit` bytes (or one chunk), even shards."""
    chunk_rows = int(array.chunks[0])
    chunks = max(math.ceil(array.shape[0] / chunk_rows), 1)
    per_shard = max(int(limit // max(chunk_rows * row_nbytes, 1)), 1)
    shards = math.ceil(chunks / per_shard)
    return math.ceil(chunks / shards) * chunk_rows  # e.g. 100 chunks, 60 per shard -> 2 shards of 50, not 60 + 40


def _copy_sharded(array: zarr.Array, target: zarr.Group, name: str, src: str | Path, shard_bytes: int) -> None:
    """Create `name` in `target` like `array` but sharded along rows, then copy it one shard per assignment."""
    rows = _shard_rows(array, _row_nbytes(array, src), shard_bytes)
    copy = target.create_array(
        name, shape=array.shape, dtype=array.metadata.data_type, chunks=array.chunks,
        shards=(rows, *array.chunks[1:]), filters=array.filters, serializer=array.serializer,
        compressors=array.compressors, fill_value=array.fill_value, attributes=array.attrs.asdict(),
        dimension_names=array.metadata.dimension_names, chunk_key_encoding=_FLAT_KEYS,
        # Every shard is stored even when it holds only fill values: re-uploading the pack over an earlier
        # upload then replaces every shard object rather than leaving an older one in place.
        config={"write_empty_chunks": True},
    )
    for start in range(0, array.shape[0], rows):
        copy[start:start + rows] = _read(array, start, start + rows, src)


def _read(array: zarr.Array, start: int, stop: int, src: str | Path) -> np.ndarray:
    """Rows `[start, stop)` of `array`; a failed checksum becomes a CacheError naming the rows."""
    try:
        return array[start:stop]
    except ValueError as exc:  # zarr's Crc32c codec reports a mismatch as ValueError
        raise CacheError(f"cannot pack {src}: {array.basename} rows {start}..{min(stop, array.shape[0]) - 1} "
                         f"are unreadable ({exc})",
                         "verify and repair the store first (kdtrack verify-cache --repair)") from exc


def _row_nbytes(array: zarr.Array, src: str | Path) -> float:
    """Encoded bytes of one row: exact for fixed-size types, the mean over the array for variable-length strings."""
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "OT":
        return math.prod(array.shape[1:]) * dtype.itemsize
    step = int(array.chunks[0]) * max(1, _ID_BLOCK // int(array.chunks[0]))
    total = 0
    for start in range(0, array.shape[0], step):
        ids = _read(array, start, start + step, src).tolist()  # one-dimensional: the sample ids
        total += sum(len(str(v).encode()) + _VLEN_PREFIX for v in ids)
    return total / max(array.shape[0], 1)
