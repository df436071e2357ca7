"""Synthetic data, seeded models and caches the benchmarks measure, made through kdtrack's public APIs."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdtrack import cache
from kdtrack.cache import LogitTable
from kdtrack.config import DataConfig
from kdtrack.data import IndexedDataset, build_dataset, dataset_digest, fit_normalisation
from kdtrack.models import ModelSpec, build_model

RANDOM_DIGEST = "random-logits"  # dataset digest recorded in stores filled with random numbers, not a teacher's


def dataset(rows: int, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> IndexedDataset:
    """`rows` synthetic samples, all in split `train`, normalised as a teacher's checkpoint would record."""
    cfg = DataConfig(source="synthetic", num_samples=rows, input_shape=tuple(input_shape), num_classes=num_classes,
                     val_fraction=0.0, test_fraction=0.0, seed=seed)
    ds = build_dataset(cfg)
    return ds.with_normalisation(fit_normalisation(ds))


def model(name: str, ds: IndexedDataset, device: torch.device, seed: int = 0) -> nn.Module:
    """A freshly initialised `name` for `ds`'s shape, weights from `seed` only: cost does not need training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ModelSpec(name, ds.num_classes, ds.input_shape, {})).to(device)


def cache_attrs(ds: IndexedDataset, teacher: str, output_shape: Sequence[int], dtype: str, digest: str) -> dict:
    """The caller attributes `cache.build` records, filled as the cache-logits stage fills them."""
    norm = None if ds.normalisation is None else ds.normalisation.to_dict()
    checkpoint = hashlib.sha256(f"benchmark teacher {teacher}".encode()).hexdigest()
    spec = ModelSpec(teacher, ds.num_classes, ds.input_shape, {}).to_dict()
    key = cache.cache_key(checkpoint_sha256=checkpoint, dataset_digest=digest, splits=["train"], dtype=dtype,
                          output_shape=list(output_shape), normalisation=norm)
    return {"teacher_run_id": "benchmark", "checkpoint_sha256": checkpoint, "dataset_digest": digest,
            "cache_key": key, "splits": ["train"], "normalisation": norm, "model_spec": spec}


def build_cache(path: Path, teacher_name: str, teacher: nn.Module, ds: IndexedDataset, device: torch.device, *,
                batch_size: int, dtype: str = "float16", amp_dtype: torch.dtype | None = None,
                digest: str | None = None, chunk_rows: int | None = None) -> cache.BuildStats:
    """`cache.build` from scratch at `path` (an earlier store there is replaced)."""
    digest = dataset_digest(ds) if digest is None else digest
    attrs = cache_attrs(ds, teacher_name, (ds.num_classes,), dtype, digest)
    return cache.build(path, teacher, ds, attrs=attrs, device=device, batch_size=batch_size, amp_dtype=amp_dtype,
                       dtype=dtype, chunk_rows=chunk_rows, resume=False, progress=False)


def cached_table(path: Path, teacher_name: str, teacher: nn.Module, ds: IndexedDataset, device: torch.device, *,
                 batch_size: int, amp_dtype: torch.dtype | None = None) -> LogitTable:
    """Build a float16 cache of `teacher` over `ds`, mark it complete, open it aligned to `ds` on `device`."""
    digest = dataset_digest(ds)
    build_cache(path, teacher_name, teacher, ds, device, batch_size=batch_size, amp_dtype=amp_dtype, digest=digest)
    cache.mark_complete(cache.open_store(path, mode="r+"), None)  # the stage verifies first; cost is what we measure
    return LogitTable.open(path, ds, expected_digest=digest).to(device)


def random_store(path: Path, rows: int, num_classes: int, dtype: str, seed: int = 0) -> None:
    """A complete store of `rows` seeded random logits (ids `synthetic/<i>`), written chunk by chunk."""
    ids = [f"synthetic/{i}" for i in range(rows)]
    labels = np.random.default_rng(seed).integers(0, num_classes, rows)
    chunk_rows = cache.default_chunk_rows((num_classes,), dtype)
    attrs = {"teacher_run_id": "none", "checkpoint_sha256": "none", "dataset_digest": RANDOM_DIGEST,
             "cache_key": RANDOM_DIGEST, "splits": ["train"], "normalisation": None, "model_spec": None}
    group = cache.create_store(path, sample_ids=ids, labels=labels, output_shape=(num_classes,), dtype=dtype,
                               chunk_rows=chunk_rows, attrs=attrs)
    rng = np.random.default_rng(seed + 1)
    for c in range(cache.num_chunks(group)):
        start, stop = cache.chunk_bounds(group, None, c)
        values = rng.standard_normal((stop - start, num_classes), dtype=np.float32) * 3.0  # (rows, C)
        group["logits"][start:stop] = values.astype(dtype)
    group["chunk_done"][:] = True
    cache.mark_complete(group, None)


def allocated_bytes(root: Path) -> int:
    """Disk blocks in use under `root`: what `du` counts, where a small file still takes a whole block."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        total += sum(os.stat(os.path.join(folder, name)).st_blocks * 512 for name in files)
    return total
