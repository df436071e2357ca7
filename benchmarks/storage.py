"""Storage: bytes per sample of each cache encoding kdtrack writes, against the raw N x C x itemsize of the logits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import fixtures
from benchmarks.report import Figure, Result
from benchmarks.settings import Settings
from kdtrack import cache
from kdtrack.cache.format import STORAGE_DTYPES

NAME = "storage"
NUM_CLASSES = 100
_ARRAYS = ("logits", "sample_ids", "labels", "chunk_done")


def run(settings: Settings) -> Result:
    """Disk blocks (and apparent bytes) of float32 and float16 stores as built, and packed into shards for upload."""
    rows = settings.storage_rows
    raw: dict[str, list[float]] = {}
    breakdown: dict[str, dict[str, int]] = {}
    figures = []
    for dtype in STORAGE_DTYPES:
        logits_bytes = rows * NUM_CLASSES * np.dtype(dtype).itemsize
        raw[f"{dtype} raw logits"] = [float(logits_bytes)]
        built = settings.workdir / f"storage_{dtype}.zarr"
        fixtures.random_store(built, rows, NUM_CLASSES, dtype)
        packed = built.with_name(f"{built.name}.packed")
        cache.pack(built, packed)
        for encoding, path in ((dtype, built), (f"{dtype} packed", packed)):
            raw[encoding] = [float(fixtures.allocated_bytes(path))]
            breakdown[encoding] = _breakdown(path)
            figures.append(Figure(f"{encoding} bytes/sample on disk", raw[encoding][0] / rows, "B",
                                  note=f"raw logits: {NUM_CLASSES * np.dtype(dtype).itemsize} B/sample"))
            figures.append(Figure.ratio(f"{encoding} store / raw logits", raw, encoding, f"{dtype} raw logits"))
        cache.remove_store(built)
        cache.remove_store(packed)
    params = {"rows": rows, "num_classes": NUM_CLASSES, "apparent_bytes": breakdown,
              "chunk_rows": {d: cache.default_chunk_rows((NUM_CLASSES,), d) for d in STORAGE_DTYPES}}
    notes = [f"{rows:,} rows x {NUM_CLASSES} classes; disk blocks in use (du), per-array apparent bytes in params; "
             "the rest over raw is sample ids, labels, done flags, CRC32C checksums and JSON metadata"]
    return Result(NAME, "Storage per sample", params, raw, {k: "B" for k in raw}, figures, notes)


def _breakdown(path: Path) -> dict[str, int]:
    """Apparent bytes per array folder, and of the group's own metadata."""
    sizes = {name: cache.store_nbytes(path / name) for name in _ARRAYS}
    sizes["metadata"] = cache.store_nbytes(path) - sum(sizes.values())
    return sizes
