"""Logit lookup: a batch of random rows from `LogitTable`, from one `.npy` file per sample, and by zarr `oindex`."""
from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from benchmarks import fixtures
from benchmarks.measure import interleaved
from benchmarks.report import Figure, Result, Target
from benchmarks.settings import Settings
from kdtrack.cache import LogitTable

NAME = "lookup"
TARGET = Target(">=", 50.0)
FULL_ROWS = 1_000_000
_FILES_PER_FOLDER = 1000
_EVICT_BYTES = 256 << 20  # more than any CPU's last-level cache
_TMPFS = Path("/dev/shm")
_TMPFS_BYTES_PER_FILE = 8192  # a page of data plus inode and directory entry, with room to spare


class NpyPerSample:
    """The layout kdtrack replaces: one `.npy` file per sample and a JSON index mapping sample id -> file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.index: dict[str, str] = json.loads((self.root / "index.json").read_text())

    @staticmethod
    def write(root: Path, sample_ids: Sequence[str], logits: zarr.Array) -> None:
        """One file per row of `logits` (read chunk by chunk), then `index.json`.

        Each file holds exactly the bytes `np.save` writes for that row; the header is made once, not per file.
        """
        root = Path(root)
        index: dict[str, str] = {}
        step = int(logits.chunks[0])
        for start in range(0, logits.shape[0], step):
            block = np.asarray(logits[start:start + step])  # (rows, C) in the stored dtype
            header = _npy_header(block[0])
            for offset, row in enumerate(block):
                i = start + offset
                relative = f"{i // _FILES_PER_FOLDER:05d}/{i}.npy"
                if i % _FILES_PER_FOLDER == 0:
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                with open(root / relative, "wb") as f:
                    f.write(header + row.tobytes())
                index[sample_ids[i]] = relative
        (root / "index.json").write_text(json.dumps(index))

    def batch(self, sample_ids: Sequence[str]) -> np.ndarray:
        """float32 (B, C): one np.load per sample, as a per-sample Dataset does."""
        return np.stack([np.load(self.root / self.index[sid]) for sid in sample_ids]).astype(np.float32)


def run(settings: Settings) -> Result:
    """Seconds per batch of `lookup_batch` random rows for each reader, rounds interleaved."""
    rows, classes, batch = settings.lookup_rows, 100, settings.lookup_batch
    store, npy_root = settings.workdir / "lookup.zarr", _npy_root(settings.workdir, rows)
    fixtures.random_store(store, rows, classes, "float16")
    logits = zarr.open_group(store, mode="r")["logits"]
    sample_ids = [f"synthetic/{i}" for i in range(rows)]
    try:
        start = time.perf_counter()
        NpyPerSample.write(npy_root, sample_ids, logits)
        npy_write_seconds = time.perf_counter() - start
        table = LogitTable.open(store, expected_digest=fixtures.RANDOM_DIGEST)  # in RAM: rows x C float16
        npy = NpyPerSample(npy_root)
        rng = np.random.default_rng(0)
        picks = {r: rng.choice(rows, size=batch, replace=False) for r in range(-1, settings.lookup_rounds)}
        variants = {"table": lambda r: table[torch.from_numpy(picks[r])],
                    "npy_per_sample": lambda r: npy.batch([sample_ids[i] for i in picks[r].tolist()]),
                    "zarr_oindex": lambda r: np.asarray(logits.oindex[picks[r]]).astype(np.float32)}
        evict = np.zeros(_EVICT_BYTES // 8)
        # A training step runs between two lookups and leaves the caches cold; without this a lookup right after
        # another finds the table's page-table entries cached and reads 3-5x faster than in training.
        raw = interleaved(variants, settings.lookup_rounds, before=lambda: np.add(evict, 1.0, out=evict))
        npy_bytes = fixtures.allocated_bytes(npy_root)
    finally:
        shutil.rmtree(npy_root, ignore_errors=True)
    figures = [Figure.ratio("npy-per-sample / LogitTable latency", raw, "npy_per_sample", "table", TARGET),
               Figure.ratio("zarr oindex / LogitTable latency", raw, "zarr_oindex", "table")]
    params = {"rows": rows, "num_classes": classes, "dtype": "float16", "batch_rows": batch,
              "chunk_rows": int(logits.chunks[0]), "npy_files": rows, "npy_write_seconds": npy_write_seconds,
              "npy_bytes_allocated": npy_bytes, "npy_folder": "tmpfs" if _on_tmpfs(npy_root) else "workdir"}
    notes = [f"{rows:,} x {classes} float16 cache, {batch} random rows per batch, {settings.lookup_rounds} rounds; "
             "CPU caches evicted before each lookup, as by a training step; the .npy files are in RAM "
             f"({'tmpfs' if _on_tmpfs(npy_root) else 'page cache'}), the best case for that layout"]
    if rows < FULL_ROWS:
        notes.append(f"reduced size: {rows:,} samples (and .npy files) instead of {FULL_ROWS:,}")
    return Result(NAME, "Logit lookup latency per batch", params, raw, {k: "s" for k in raw}, figures, notes)


def _npy_root(workdir: Path, rows: int) -> Path:
    """A fresh folder on tmpfs when it has room, else in `workdir`.

    On tmpfs the files are read from RAM, as from a warm page cache, and a million of them are written and deleted
    in seconds; on a disk deleting them can take minutes.
    """
    if _TMPFS.is_dir() and shutil.disk_usage(_TMPFS).free > 2 * rows * _TMPFS_BYTES_PER_FILE:
        return Path(tempfile.mkdtemp(prefix="kdtrack-bench-npy-", dir=_TMPFS))
    return workdir / "lookup_npy"


def _on_tmpfs(path: Path) -> bool:
    return _TMPFS in path.parents


def _npy_header(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(row))
    return buf.getvalue()

