"""Tiny cache-building setup shared by the cache tests (and, imported, by the fault children)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdtrack.cache import BuildStats, build, cache_key
from kdtrack.data import IndexedDataset, Normalisation, dataset_digest

N_ROWS, CHUNK_ROWS, BATCH = 512, 32, 8  # 16 chunks of 4 batches each
NUM_CLASSES = 5
NORM = Normalisation(0.5, 2.0)


def tiny_dataset(n: int = N_ROWS, seed: int = 0) -> IndexedDataset:
    """`n` seeded rows of shape (1, 4, 4) with labels 0..4 (every 7th unlabelled), normalised by NORM."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    labels[::7] = -1
    return IndexedDataset(
        features=rng.standard_normal((n, 1, 4, 4)).astype(np.float32) * 3.0 + 1.0,
        labels=labels, sample_ids=[f"tiny/{i}" for i in range(n)], splits=np.full(n, "train"),
        domains=np.full(n, "default"), num_classes=NUM_CLASSES, source="tiny", normalisation=NORM,
    )


def tiny_model(seed: int = 0, out: int = NUM_CLASSES) -> nn.Module:
    """Flatten + Linear(16, out), weights from `seed` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, out)).eval()


def tiny_attrs(ds: IndexedDataset, output_shape: tuple[int, ...] = (NUM_CLASSES,), dtype: str = "float32",
               checkpoint: str = "ckpt0") -> dict:
    """The caller attributes of a cache of `ds`, with its real digest and key."""
    digest = dataset_digest(ds)
    norm = ds.normalisation.to_dict()
    key = cache_key(checkpoint_sha256=checkpoint, dataset_digest=digest, splits=["train"], dtype=dtype,
                    output_shape=output_shape, normalisation=norm)
    return {"teacher_run_id": "run0", "checkpoint_sha256": checkpoint, "dataset_digest": digest,
            "cache_key": key, "splits": ["train"], "normalisation": norm, "model_spec": {"name": "linear"}}


def build_tiny_cache(path: str | Path, model: nn.Module | None = None) -> BuildStats:
    """Build (or resume) the cache of `model` (default `tiny_model()`) over `tiny_dataset()` at `path`, on the CPU."""
    ds = tiny_dataset()
    return build(path, tiny_model() if model is None else model, ds, attrs=tiny_attrs(ds),
                 device=torch.device("cpu"), batch_size=BATCH, chunk_rows=CHUNK_ROWS, progress=False)

