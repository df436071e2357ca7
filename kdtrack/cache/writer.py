"""Resumable, deterministic cache build: teacher forward chunk by chunk, writes overlapped on a background thread.

Every chunk is computed as batches that start at the chunk's first row, so its numbers never depend on which
other chunks ran in the same call; an interrupted build that is resumed ends bit-identical to a clean one.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn
from zarr.storage import LocalStore

from kdtrack.cache.format import (STORAGE_DTYPES, chunk_bounds, chunk_rows_for, create_store, done_flags, is_store,
                                  num_chunks, open_store, remove_store)
from kdtrack.cache.ids import encode_ids
from kdtrack.data import IndexedDataset
from kdtrack.data.loaders import block_loader
from kdtrack.errors import BadInput, CacheError
from kdtrack.progress import Progress

_QUEUE_CHUNKS = 3  # chunks computed but not yet written; bounds host memory at a few times ~4 MiB


@dataclass(frozen=True)
class PriorRows:
    """The dataset's first `rows` rows equal (ids, labels, content, order) those of the complete store at `path`."""

    path: str | Path
    rows: int


@dataclass(frozen=True)
class BuildStats:
    """What one `build` call did; `rows_per_s` counts computed rows only."""

    rows_computed: int
    rows_copied: int
    chunks_written: int
    seconds: float
    rows_per_s: float
    batch_size_used: int


def forward(model: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`model(x)`; a model that needs the batch's store rows (augment.ViewTeacher: views keyed by row) gets them."""
    return model(x, rows) if getattr(model, "takes_rows", False) else model(x)


def probe_output_shape(model: nn.Module, dataset: IndexedDataset, device: torch.device) -> tuple[int, ...]:
    """Per-sample output shape from one forward of row 0: `(C,)` for class logits, e.g. `(T, ch)` for a signal."""
    if len(dataset) == 0:
        raise BadInput("cannot cache an empty dataset", "select splits that contain samples")
    model.eval()
    try:
        with torch.inference_mode():
            out = forward(model, dataset.batch([0])[0].to(device), torch.zeros(1, dtype=torch.int64))
    except RuntimeError as exc:
        if _is_oom(exc):
            raise _oom_at_batch_one(device, str(exc)) from exc
        raise
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"the teacher returned {got} for one sample, need a tensor (1, *output_shape)",
                       "cache a model whose forward returns one tensor of logits or signal per sample")
    return tuple(int(d) for d in out.shape[1:])


def build(
    path: str | Path,
    model: nn.Module,
    dataset: IndexedDataset,
    *,
    attrs: Mapping[str, Any],
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    resume: bool = True,
    chunks: Iterable[int] | None = None,
    force_chunks: bool = False,
    prior: PriorRows | None = None,
    progress: bool | None = None,
    num_workers: int = 0,
) -> BuildStats:
    """Cache `model`'s outputs for every row of `dataset` (row order) into the store at `path`; return stats.

    Only chunks in `chunks` (default all) that are not done are computed; `force_chunks` recomputes done ones
    (repair). Several writers share a store by owning disjoint `chunks` with resume=True, after one call with
    `chunks=[]` has created it. A lazy (file-backed) dataset's batches are read ahead by `num_workers` DataLoader
    workers while the teacher runs.
    """
    if batch_size < 1:
        raise BadInput(f"need batch_size >= 1, got {batch_size}", "e.g. --set cache.batch_size=1024")
    if dtype not in STORAGE_DTYPES:
        raise BadInput(f"need dtype in {list(STORAGE_DTYPES)}, got {dtype!r}", "e.g. --set cache.dtype=float16")
    start_time = time.perf_counter()
    model.eval()
    output_shape = probe_output_shape(model, dataset, device)
    group = _prepare_store(Path(path), dataset, attrs, output_shape, dtype, chunk_rows, resume)
    wanted = _owned_chunks(group, chunks)
    done = done_flags(group)
    todo = [c for c in wanted if force_chunks or not done[c]]
    if not todo:
        return BuildStats(0, 0, 0, time.perf_counter() - start_time, 0.0, batch_size)
    if group.attrs.get("complete"):
        group.update_attributes({"complete": False})  # contents change: completeness needs a new verification
    _remove_dead_writes(Path(path), todo)
    source = _PriorSource(prior, group, dataset) if prior is not None else None
    runner = _ChunkRunner(model, dataset, device, amp_dtype, getattr(torch, dtype), output_shape, batch_size,
                          num_workers if dataset.lazy else 0)
    rewrite = dataset if force_chunks else None  # a repaired chunk may have lost its ids or labels too
    total, copied = _fill_chunks(group, todo, runner, source, rewrite, f"cache {Path(path).name}", progress)
    seconds = time.perf_counter() - start_time
    computed = total - copied
    return BuildStats(computed, copied, len(todo), seconds, computed / seconds if computed else 0.0, runner.batch_size)


def _remove_dead_writes(path: Path, chunks: list[int]) -> None:
    """Delete the temporary files a killed write left for these chunks (zarr writes `<key>.<uuid>.partial`, then
    renames it): they are about to be written again by this call, which owns them, and must not ship with the store.
    Other writers' chunks are left alone."""
    for c in chunks:
        for folder in (path / "logits" / "c" / str(c), path / "chunk_done" / "c"):
            pattern = "**/*.partial" if folder.name == str(c) else f"{c}.*.partial"
            for dead in folder.glob(pattern):  # nothing when the folder is missing
                dead.unlink(missing_ok=True)


def _fill_chunks(group: zarr.Group, todo: list[int], runner: _ChunkRunner, source: _PriorSource | None,
                 rewrite: IndexedDataset | None, desc: str, progress: bool | None) -> tuple[int, int]:
    """Copy or compute each chunk of `todo` and hand it to the writer thread; return (rows, rows copied)."""
    bounds = [chunk_bounds(group, None, c) for c in todo]
    splits = [start if source is None else min(max(source.rows, start), stop) for start, stop in bounds]
    total, copied = sum(stop - start for start, stop in bounds), 0
    runner.read_ahead([(split, stop) for split, (_, stop) in zip(splits, bounds)])
    with _ChunkWriter(group, rewrite) as writer, Progress(total, desc, unit="rows", enabled=progress) as bar:
        for c, (start, stop), split in zip(todo, bounds, splits):  # rows < split are copied
            block = runner.empty(stop - start)  # (rows, *output_shape) in the storage dtype, pinned on CUDA
            if split > start:
                block[: split - start] = torch.from_numpy(source.read(start, split))
                bar.update(split - start)
            runner.compute(split, stop, block[split - start:], bar)
            writer.put(c, start, block)
            copied += split - start
    return total, copied

def _prepare_store(
    path: Path, dataset: IndexedDataset, attrs: Mapping[str, Any], output_shape: tuple[int, ...], dtype: str,
    chunk_rows: int | None, resume: bool,
) -> zarr.Group:
    """Open the store at `path` for resuming when its key matches `attrs`, else (re)create it empty."""
    if "cache_key" not in attrs:
        raise BadInput("build attrs lack cache_key", "compute it with kdtrack.cache.cache_key(...)")
    _check_attrs_match_dataset(attrs, dataset)
    if resume and is_store(path):
        group = zarr.open_group(path, mode="r+")
        if group.attrs.get("initialised") and group.attrs.get("cache_key") == attrs["cache_key"]:
            group = open_store(path, "r+")
            _check_resumable(group, path, (len(dataset), output_shape, dtype), chunk_rows)
            return group
    remove_store(path)  # a foreign path is refused there, never deleted
    rows = chunk_rows_for(len(dataset), output_shape, dtype, chunk_rows)
    return create_store(path, sample_ids=dataset.sample_ids, labels=dataset.labels, output_shape=output_shape,
                        dtype=dtype, chunk_rows=rows, attrs=attrs)


def _check_attrs_match_dataset(attrs: Mapping[str, Any], dataset: IndexedDataset) -> None:
    norm = None if dataset.normalisation is None else dataset.normalisation.to_dict()
    if "normalisation" in attrs and attrs["normalisation"] != norm:
        raise BadInput(f"attrs normalisation {attrs['normalisation']} differs from the dataset's {norm}",
                       "apply the teacher's normalisation with dataset.with_normalisation(...) and record that one")
    outside = sorted(set(dataset.splits.tolist()) - set(attrs.get("splits", [])))
    if "splits" in attrs and outside:
        raise BadInput(f"the dataset holds splits {outside} that attrs splits {attrs['splits']} do not name",
                       "select exactly the recorded splits with dataset.select(splits)")


def _check_resumable(group: zarr.Group, path: Path, wanted: tuple[int, tuple[int, ...], str],
                     chunk_rows: int | None) -> None:
    stored = (int(group.attrs["num_rows"]), tuple(group.attrs["output_shape"]), group.attrs["dtype"])
    if stored != wanted:
        raise CacheError(f"the cache at {path} has the requested key but (rows, output shape, dtype) {stored}, "
                         f"not {wanted}", "rebuild it with resume=False (kdtrack cache-logits --no-resume)")
    if chunk_rows is not None and chunk_rows_for(*wanted, chunk_rows) != group.attrs["chunk_rows"]:
        raise BadInput(f"chunk_rows={chunk_rows} but the store being resumed at {path} has {group.attrs['chunk_rows']}",
                       "leave chunk_rows unset to resume, or pass resume=False to rebuild")


def _owned_chunks(group: zarr.Group, chunks: Iterable[int] | None) -> list[int]:
    total = num_chunks(group)
    if chunks is None:
        return list(range(total))
    owned = sorted({int(c) for c in chunks})
    bad = [c for c in owned if not 0 <= c < total]
    if bad:
        raise BadInput(f"chunks {bad[:5]} are outside this store's 0..{total - 1}", "pass chunk indices of this store")
    return owned


class _PriorSource:
    """Reads rows `[0, rows)` from a complete earlier store of the same teacher, checking ids as it goes."""

    def __init__(self, prior: PriorRows, group: zarr.Group, dataset: IndexedDataset) -> None:
        old = open_store(prior.path)
        same = ("checkpoint_sha256", "normalisation", "dtype", "output_shape")
        differ = [k for k in same if old.attrs.get(k) != group.attrs.get(k)]
        if not old.attrs.get("complete") or differ:
            raise BadInput(f"prior store {prior.path} is " + (f"different in {differ}" if differ else "not complete"),
                           "pass as prior only a complete, verified cache of the same teacher checkpoint and dtype")
        if not 0 <= prior.rows <= min(int(old.attrs["num_rows"]), len(dataset)):
            raise BadInput(f"prior rows {prior.rows} exceed the prior store ({old.attrs['num_rows']}) or the dataset "
                           f"({len(dataset)})", "count only the leading rows both share")
        self.path, self.rows, self.old, self.ids = prior.path, prior.rows, old, dataset.sample_ids

    def read(self, start: int, stop: int) -> np.ndarray:
        """Logits of rows `[start, stop)` of the prior store, after checking their ids are this dataset's."""
        old_ids = self.old["sample_ids"][start:stop].tolist()
        if old_ids != self.ids[start:stop]:
            raise BadInput(f"prior store {self.path} rows {start}..{stop - 1} hold other sample ids than the dataset",
                           "pass prior only when the dataset starts with exactly the prior store's rows")
        return np.asarray(self.old["logits"][start:stop])


class _ChunkRunner:
    """Teacher forward over row ranges, their inputs read in blocks of `batch_size` rows (ahead, by DataLoader
    workers, when `num_workers` > 0); forwards take `batch_size` rows, halved on out-of-memory."""

    def __init__(self, model: nn.Module, dataset: IndexedDataset, device: torch.device, amp: torch.dtype | None,
                 store_dtype: torch.dtype, output_shape: tuple[int, ...], batch_size: int, num_workers: int) -> None:
        self.model, self.dataset, self.device, self.amp = model, dataset, device, amp
        self.store_dtype, self.output_shape, self.batch_size = store_dtype, output_shape, batch_size
        self.block_rows, self.num_workers = batch_size, num_workers
        self.cuda = device.type == "cuda"
        self._inputs: Iterator[tuple[torch.Tensor, ...]] = iter(())

    def read_ahead(self, ranges: list[tuple[int, int]]) -> None:
        """The row ranges `compute` will be called with, in order."""
        blocks = [range(lo, min(lo + self.block_rows, stop)) for start, stop in ranges
                  for lo in range(start, stop, self.block_rows)]  # from each range's first row: deterministic
        self._inputs = iter(block_loader(self.dataset, blocks, num_workers=self.num_workers, device=self.device))

    def empty(self, rows: int) -> torch.Tensor:
        """Host buffer (rows, *output_shape); pinned on CUDA so device-to-host copies do not block."""
        return torch.empty((rows, *self.output_shape), dtype=self.store_dtype, pin_memory=self.cuda)

    def compute(self, start: int, stop: int, out: torch.Tensor, bar: Progress) -> None:
        """Fill `out` with the outputs of rows `[start, stop)`, the next range given to `read_ahead`."""
        for lo in range(start, stop, self.block_rows):
            x, _, rows, _ = next(self._inputs)
            if int(rows[0]) != lo or len(rows) != min(self.block_rows, stop - lo):
                raise RuntimeError(f"read rows {int(rows[0])}.. where rows {lo}.. were due")  # a bug, not bad input
            self._forward_block(x, rows, out[lo - start:lo - start + len(rows)], bar)
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the non-blocking copies into `out` must land before it is written

    def _forward_block(self, x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, bar: Progress) -> None:
        """One block's outputs in batches; retries the block with half the batch on out-of-memory."""
        while True:
            reported = 0
            try:
                with torch.inference_mode(), \
                        torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    for a in range(0, len(rows), self.batch_size):
                        b = min(a + self.batch_size, len(rows))
                        y = forward(self.model, x[a:b].to(self.device, non_blocking=self.cuda), rows[a:b])
                        out[a:b].copy_(y.to(self.store_dtype), non_blocking=self.cuda)
                        bar.update(b - a)
                        reported += b - a
                return
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                message = str(exc)  # handled below the except block, so the traceback's tensors are freed first
            bar.update(-reported)
            if self.batch_size == 1:
                raise _oom_at_batch_one(self.device, message)
            self.batch_size //= 2
            if self.cuda:
                torch.cuda.empty_cache()
            print(f"warning: out of memory on {self.device}; retrying rows {int(rows[0])}..{int(rows[-1])} "
                  f"with batch size {self.batch_size}", file=sys.stderr)


def _is_oom(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _oom_at_batch_one(device: torch.device, message: str) -> CacheError:
    first = message.splitlines()[0] if message else "out of memory"
    return CacheError(f"out of memory on {device} even at batch size 1 ({first})",
                      "free device memory, or build on a device with more memory")


class _ChunkWriter:
    """Background thread writing finished chunks (logits, then the done flag); its errors surface in `put`/exit.

    With `dataset` given, each chunk's sample ids and labels are rewritten too (repair of a damaged chunk).
    """

    def __init__(self, group: zarr.Group, dataset: IndexedDataset | None = None) -> None:
        self.group, self.dataset = group, dataset
        self.logits, self.flags = group["logits"], group["chunk_done"]
        self.queue: queue.Queue[tuple[int, int, torch.Tensor] | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self.error: tuple[int, BaseException] | None = None
        self.thread = threading.Thread(target=self._run, name="kdtrack-cache-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # On an interrupt the chunks already queued are still written: they are complete and save work on resume.
        self.queue.put(None)
        self.thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def put(self, c: int, start: int, block: torch.Tensor) -> None:
        """Queue chunk `c` (rows from `start`); blocks while the queue is full, raises a writer failure."""
        self._raise_if_failed()
        self.queue.put((c, start, block))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a full queue
            c, start, block = item
            try:
                stop = start + len(block)
                _write_rows(self.logits, start, block.numpy())
                if self.dataset is not None:
                    ids = self.dataset.sample_ids[start:stop]
                    _write_rows(self.group["sample_ids"], start, np.asarray(ids, dtype=str))
                    _write_rows(self.group["sample_ids_utf8"], start,
                                encode_ids(ids, self.group["sample_ids_utf8"].shape[1]))
                    _write_rows(self.group["labels"], start, self.dataset.labels[start:stop])
                _write_rows(self.flags, c, np.array([True]))  # only after the logits are on disk
            except Exception as exc:  # any failure must reach the caller's thread, not die here unseen
                self.error = (c, exc)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            c, exc = self.error
            raise CacheError(f"writing chunk {c} of the cache failed: {exc}",
                             "check free disk space and write permission, then rerun; the build resumes") from exc


def _write_rows(array: zarr.Array, start: int, values: np.ndarray) -> None:
    """`array[start:start + len(values)] = values`, also when the shard holding those rows has corrupt chunks.

    In a sharded (packed) store zarr writes one chunk by decoding the shard's index and re-encoding the shard; the
    short last chunk of an array is decoded too, to merge it. So a corrupt index, or a corrupt last chunk, fails the
    write. The shard is then rewritten whole from its chunks that still decode and these rows; the chunks that do
    not decode are left as removed (fill values), and verification names them for repair.
    """
    stop = start + len(values)
    try:
        array[start:stop] = values
        return
    except ValueError:  # zarr's Crc32c codec reports a mismatch as ValueError
        if array.shards is None or not isinstance(array.store, LocalStore):
            raise
        salvaged = _salvage_shard(array, start)
        if salvaged is None:  # every chunk decodes: the failure is not corruption
            raise
    first, rows = salvaged
    rows[start - first:stop - first] = values
    shard = (start // int(array.shards[0]), *[0] * (array.ndim - 1))  # shards split rows only
    (Path(array.store.root) / array.path / array.metadata.encode_chunk_key(shard)).unlink()  # it failed to decode
    array[first:first + len(rows)] = rows


def _salvage_shard(array: zarr.Array, row: int) -> tuple[int, np.ndarray] | None:
    """(first row, rows) of the shard holding `row`, fill values for its chunks that do not decode; None if all do."""
    shard_rows, chunk_rows, end = int(array.shards[0]), int(array.chunks[0]), array.shape[0]
    first = row // shard_rows * shard_rows
    pieces, lost = [], False
    for lo in range(first, min(first + shard_rows, end), chunk_rows):
        hi = min(lo + chunk_rows, end)
        try:
            pieces.append(array[lo:hi])
        except ValueError:
            pieces.append(np.full((hi - lo, *array.shape[1:]), array.fill_value))  # a scalar of the array's dtype
            lost = True
    return (first, np.concatenate(pieces)) if lost else None
