"""A student epoch over a cache bigger than its memory budget: chunk-aware order against the whole cache in RAM.

Each step looks up the batch's cached logits and takes one KD step of a small MLP (what a cached-KD student does
per batch), over every row once. Variants: the table in RAM with the uniform shuffle (the reference), the table
read by whole chunks under a budget of 4 chunks with the chunk-aware order (what train-student switches to), and
with the uniform shuffle (what it would do without the switch: measured on a few batches only, it reads most
chunks per batch).
"""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.measure import interleaved
from benchmarks.report import Figure, Result, Target
from benchmarks.settings import Settings
from kdtrack import cache
from kdtrack.cache import ChunkAwareSampler, LogitTable
from kdtrack.data import EpochShuffleSampler
from kdtrack.losses.kd import kd_loss

NAME = "over_budget"
TARGET = Target("<=", 1.2)
_CLASSES, _CHUNKS, _RESIDENT, _FEATURES, _UNIFORM_BATCHES = 100, 32, 4, 64, 8


def run(settings: Settings) -> Result:
    rows, batch = settings.lookup_rows, settings.lookup_batch
    path = settings.workdir / "over_budget.zarr"
    chunk_rows = -(-rows // _CHUNKS)
    _write_store(path, rows, chunk_rows)
    budget = _RESIDENT * chunk_rows * _CLASSES * 2  # float16 bytes of 4 chunks
    in_ram = LogitTable.open(path, require_complete=True)
    chunked = LogitTable.open(path, memory_budget_bytes=budget)
    chunked_uniform = LogitTable.open(path, memory_budget_bytes=budget)
    assert in_ram.in_memory and not chunked.in_memory
    features = torch.randn(rows, _FEATURES, generator=torch.Generator().manual_seed(0))
    student = torch.nn.Sequential(torch.nn.Linear(_FEATURES, 128), torch.nn.ReLU(), torch.nn.Linear(128, _CLASSES))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    uniform, aware = EpochShuffleSampler(rows, seed=0), ChunkAwareSampler(chunked, seed=0)

    def epoch(table: LogitTable, sampler, limit: int | None = None):
        def one(r: int) -> None:
            sampler.set_epoch(r + 1)
            order = torch.as_tensor(list(sampler), dtype=torch.int64)
            for i, start in enumerate(range(0, rows, batch)):
                if limit is not None and i == limit:
                    break
                index = order[start:start + batch]
                teacher = table[index]
                loss = kd_loss(student(features[index]), teacher, 4.0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return one

    variants = {"in_ram_uniform": epoch(in_ram, uniform), "over_budget_chunk_aware": epoch(chunked, aware),
                "over_budget_uniform_8_batches": epoch(chunked_uniform, uniform, _UNIFORM_BATCHES),
                "in_ram_uniform_8_batches": epoch(in_ram, uniform, _UNIFORM_BATCHES)}
    raw = interleaved(variants, settings.repeats)
    rounds = settings.repeats + 1  # with the warm-up
    figures = [Figure.ratio("epoch over budget (chunk-aware) / in RAM", raw, "over_budget_chunk_aware",
                            "in_ram_uniform", TARGET),
               Figure.ratio("8 batches over budget (uniform shuffle) / in RAM", raw, "over_budget_uniform_8_batches",
                            "in_ram_uniform_8_batches")]
    params = {"rows": rows, "classes": _CLASSES, "dtype": "float16", "chunk_rows": chunk_rows,
              "chunks": cache.num_chunks(cache.open_store(path)), "resident_chunks": _RESIDENT, "batch_rows": batch,
              "chunk_loads_per_chunk_aware_epoch": chunked.chunk_loads / rounds,
              "chunk_loads_per_uniform_batch": chunked_uniform.chunk_loads / rounds / _UNIFORM_BATCHES}
    notes = [f"{rows:,} rows x {_CLASSES} float16 in {params['chunks']} chunks on local disk (page cache warm after "
             f"the first round), a budget of {_RESIDENT} chunks; each step a KD step of a {_FEATURES}-128-"
             f"{_CLASSES} MLP on batches of {batch}"]
    return Result(NAME, "Student epoch with a cache over the memory budget", params, raw, {k: "s" for k in raw},
                  figures, notes)


def _write_store(path, rows: int, chunk_rows: int) -> None:
    ids = [f"synthetic/{i}" for i in range(rows)]
    rng = np.random.default_rng(0)
    attrs = {"teacher_run_id": "none", "checkpoint_sha256": "none", "dataset_digest": "0" * 64,
             "cache_key": "0" * 64, "splits": ["train"], "normalisation": None, "model_spec": None}
    group = cache.create_store(path, sample_ids=ids, labels=rng.integers(0, _CLASSES, rows), output_shape=(_CLASSES,),
                               dtype="float16", chunk_rows=chunk_rows, attrs=attrs)
    for c in range(cache.num_chunks(group)):
        start, stop = cache.chunk_bounds(group, None, c)
        group["logits"][start:stop] = (rng.standard_normal((stop - start, _CLASSES)) * 3).astype(np.float16)
    group["chunk_done"][:] = True
    cache.mark_complete(group, None)
