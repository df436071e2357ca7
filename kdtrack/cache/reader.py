"""LogitTable: cached teacher logits indexed by dataset row, from RAM or, past a memory budget, by whole chunks."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Sampler
from zarr.core.buffer.cpu import NDBuffer

from kdtrack.data.dataset import IndexedDataset
from kdtrack.errors import CacheError

from kdtrack.cache.format import FORMAT as STORE_FORMAT
from kdtrack.cache.format import STORAGE_DTYPES, chunk_bounds

_ARRAYS = ("logits", "sample_ids", "labels", "chunk_done")
_DTYPES = tuple(np.dtype(name) for name in STORAGE_DTYPES)
_SHOW_MISSING = 3  # ids quoted in a "not in the cache" message
_DEFAULT_WINDOW = 4  # chunks whose rows ChunkAwareSampler interleaves


def _verify_hint(attrs: dict[str, Any]) -> str:
    return (f"run: kdtrack verify-cache --run-id <cache run id> --repair "
            f"(the cache of teacher run {attrs.get('teacher_run_id', '?')})")


def default_memory_budget(processes: int = 1) -> int:
    """Bytes of logits a LogitTable may hold in RAM by default: half the memory available now, shared by the
    `processes` of this machine (DDP ranks)."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // 2 // max(processes, 1)


class LogitTable:
    """Teacher logits of one `kdtrack.logits/2` store; `table[rows]` is float32 (B, *output_shape).

    Build it with `LogitTable.open`. Rows are dataset rows when opened with a dataset, else cache rows.
    """

    def __init__(self, path: str, group: zarr.Group, rows: np.ndarray, memory_budget_bytes: int) -> None:
        self.path = path
        self._array = group["logits"]
        self._attrs = dict(group.attrs)
        self._rows = rows  # (num_rows,) cache row of each table row
        self._done = _read_whole(group, "chunk_done", path, self._attrs).astype(bool)
        self._labels = _read_whole(group, "labels", path, self._attrs).astype(np.int64)[rows]
        self.chunk_rows = int(self._array.chunks[0])
        self.num_chunks = math.ceil(self._array.shape[0] / self.chunk_rows)
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._row_nbytes = math.prod(self.output_shape) * self.dtype.itemsize
        self.in_memory = self.nbytes <= self.memory_budget_bytes
        self.max_resident_chunks = self.num_chunks if self.in_memory else \
            self.memory_budget_bytes // (self.chunk_rows * self._row_nbytes)
        self.chunk_loads = 0  # whole-chunk reads so far; a chunk-aware epoch reads each chunk about once
        # past the budget, resident chunks live in slots of one slab, so a batch is one index_select as in RAM
        self._slab: torch.Tensor | None = None  # (slots * chunk_rows, *output_shape), stored dtype; made on first use
        self._slot_of_chunk = np.full(self.num_chunks, -1, dtype=np.int64)
        self._chunk_in_slot = np.full(max(self.max_resident_chunks, 0), -1, dtype=np.int64)
        self._slot_used = np.zeros(max(self.max_resident_chunks, 0), dtype=np.int64)  # last lookup of each slot
        self._lookups = 0
        self._logits: torch.Tensor | None = None
        if self.in_memory:
            self._logits = torch.from_numpy(self._read_aligned())
        elif self.max_resident_chunks < 1:
            need = self.chunk_rows * self._row_nbytes
            raise CacheError(f"memory budget {self.memory_budget_bytes} B holds no chunk of {path} ({need} B each)",
                             f"raise memory_budget_bytes to at least {need}")

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        dataset: IndexedDataset | None = None,
        *,
        expected_digest: str | None = None,
        memory_budget_bytes: int = 2 * 1024**3,
        require_complete: bool = True,
    ) -> LogitTable:
        """Open and check the store at `path`; with `dataset`, align it so table row i is dataset row i.

        Logits are loaded into RAM when they fit in `memory_budget_bytes`, else read by whole chunks (LRU).
        """
        path = os.fspath(path)
        group = _open_group(path)
        attrs = dict(group.attrs)
        _check_attrs(path, attrs, expected_digest, require_complete)
        _check_layout(path, group, attrs, require_complete)
        if dataset is None:
            rows = np.arange(group["logits"].shape[0], dtype=np.int64)
        else:
            rows = align_rows(_read_whole(group, "sample_ids", path, attrs), dataset.sample_ids, path, attrs)
        return cls(path, group, rows, memory_budget_bytes)

    @property
    def num_rows(self) -> int:
        """Rows served: len(dataset) when aligned, else the store's N."""
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one row's output, e.g. (C,) or (T, ch)."""
        return tuple(int(d) for d in self._array.shape[1:])

    @property
    def num_classes(self) -> int | None:
        """The store's `num_classes` attribute (None for non-classification outputs)."""
        value = self._attrs.get("num_classes")
        return None if value is None else int(value)

    @property
    def dtype(self) -> np.dtype:
        """Stored dtype (float16 or float32); lookups always return float32."""
        return np.dtype(self._array.dtype)

    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the store's group attributes."""
        return dict(self._attrs)

    @property
    def nbytes(self) -> int:
        """Bytes of the logits this table serves, in the stored dtype (what in-memory mode holds)."""
        return self.num_rows * self._row_nbytes

    @property
    def resident_nbytes(self) -> int:
        """Bytes of logits held now: all of them in memory mode, the resident chunks otherwise."""
        if self._logits is not None:
            return self._logits.numel() * self._logits.element_size()
        return int((self._chunk_in_slot >= 0).sum()) * self.chunk_rows * self._row_nbytes

    @property
    def labels(self) -> np.ndarray:
        """Cached labels (num_rows,) int64, in table-row order."""
        return self._labels

    def cache_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The store row (int64, on the rows' device) of each table row: what keys a cached view's augmentation."""
        return torch.from_numpy(self._rows[rows.cpu().numpy()]).to(rows.device)

    def chunk_of(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Store chunk index (int64) of each table row."""
        return self._rows[np.asarray(rows, dtype=np.int64)] // self.chunk_rows

    def to(self, device: torch.device) -> LogitTable:
        """Keep an in-memory table on `device` (e.g. the GPU), so a lookup by device rows needs no host sync."""
        if self._logits is not None:
            self._logits = self._logits.to(device)
        return self

    def __getitem__(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits (B, *output_shape) float32 for table rows (B,), in request order."""
        if self._logits is not None:
            index = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows, dtype=torch.int64)
            if index.dtype == torch.int64 and index.dim() == 1:
                return self._logits.index_select(0, index).float()  # ~3x cheaper than advanced indexing
            return self._logits[index].float()
        if isinstance(rows, torch.Tensor):  # served on the rows' device
            return self._gather(rows.cpu().numpy()).to(rows.device, non_blocking=True)
        return self._gather(np.asarray(rows, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers each fill their own slab rather than copying the parent's chunks
        state = self.__dict__.copy()
        state["_slab"] = None
        state["_slot_of_chunk"] = np.full_like(self._slot_of_chunk, -1)
        state["_chunk_in_slot"] = np.full_like(self._chunk_in_slot, -1)
        return state

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        cache_rows = self._rows[rows.reshape(-1)]
        chunks = cache_rows // self.chunk_rows
        slots = self._slot_of_chunk[chunks]
        if not len(slots):
            return torch.empty((*rows.shape, *self.output_shape), dtype=torch.float32)
        if (slots < 0).any():
            needed = np.unique(chunks)
            if len(needed) > len(self._chunk_in_slot):  # more chunks than the budget holds: one chunk at a time
                return self._gather_by_chunk(cache_rows, chunks, needed).reshape(*rows.shape, *self.output_shape)
            for k in np.unique(chunks[slots < 0]).tolist():
                self._load(k, keep=needed)
            slots = self._slot_of_chunk[chunks]
        return self._from_slots(slots, cache_rows, chunks).reshape(*rows.shape, *self.output_shape)

    def _gather_by_chunk(self, cache_rows: np.ndarray, chunks: np.ndarray, needed: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(cache_rows), *self.output_shape), dtype=torch.float32)
        # resident chunks first, so loading the others cannot evict one this batch still needs
        for k in sorted(needed.tolist(), key=lambda k: self._slot_of_chunk[k] < 0):
            if self._slot_of_chunk[k] < 0:
                self._load(k, keep=np.array([], dtype=np.int64))
            sel = np.flatnonzero(chunks == k)
            in_k = chunks[sel]
            out[torch.from_numpy(sel)] = self._from_slots(self._slot_of_chunk[in_k], cache_rows[sel], in_k)
        return out

    def _from_slots(self, slots: np.ndarray, cache_rows: np.ndarray, chunks: np.ndarray) -> torch.Tensor:
        """Float32 logits of `cache_rows`, whose `chunks` sit in `slots`; those slots count as used by this lookup."""
        self._lookups += 1
        self._slot_used[slots] = self._lookups
        index = torch.from_numpy(slots * self.chunk_rows + (cache_rows - chunks * self.chunk_rows))
        return self._slab.index_select(0, index).float()

    def _load(self, k: int, keep: np.ndarray) -> None:
        """Read chunk k into the free slot, or the least recently used one holding no chunk of `keep`."""
        if self._slab is None:
            self._slab = torch.empty((len(self._chunk_in_slot) * self.chunk_rows, *self.output_shape),
                                     dtype=getattr(torch, self.dtype.name))
        free = np.flatnonzero(self._chunk_in_slot < 0)
        if len(free):
            slot = int(free[0])
        else:
            evictable = np.flatnonzero(~np.isin(self._chunk_in_slot, keep))
            slot = int(evictable[np.argmin(self._slot_used[evictable])])
            self._slot_of_chunk[self._chunk_in_slot[slot]] = -1
            self._chunk_in_slot[slot] = -1  # until the read succeeds
        start, stop = chunk_bounds(self._array.shape[0], self.chunk_rows, k)
        self._read_chunk(k, out=self._slab.numpy()[slot * self.chunk_rows:slot * self.chunk_rows + stop - start])
        self._slot_of_chunk[k], self._chunk_in_slot[slot] = slot, k

    def _read_aligned(self) -> np.ndarray:
        """All served rows in table order, read chunk by chunk and scattered into one array."""
        out = np.empty((self.num_rows, *self.output_shape), dtype=self.dtype)
        if np.array_equal(self._rows, np.arange(self._array.shape[0])):
            for k in range(self.num_chunks):
                self._read_chunk(k, out=out[k * self.chunk_rows:(k + 1) * self.chunk_rows])
            return out
        order = np.argsort(self._rows, kind="stable")
        sorted_rows = self._rows[order]
        bounds = np.searchsorted(sorted_rows, np.arange(self.num_chunks + 1) * self.chunk_rows)
        for k in range(self.num_chunks):
            lo, hi = bounds[k], bounds[k + 1]
            if lo < hi:  # chunks no dataset row maps to are never read
                out[order[lo:hi]] = self._read_chunk(k)[sorted_rows[lo:hi] - k * self.chunk_rows]
        return out

    def _read_chunk(self, k: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk k (rows, *output_shape) in the stored dtype, into `out` when given (zarr decodes straight into it,
        ~4x faster than a read and a copy); a bad checksum or a hole is a CacheError."""
        rows = slice(k * self.chunk_rows, (k + 1) * self.chunk_rows)
        try:
            if out is None:
                out = np.asarray(self._array[rows])
            else:
                self._array.get_basic_selection(rows, out=NDBuffer.from_numpy_array(out))
        except ValueError as exc:  # zarr's Crc32c codec reports a mismatch as ValueError
            raise CacheError(f"chunk {k} of {self.path}/logits is corrupt ({exc})", _verify_hint(self._attrs)) from exc
        self.chunk_loads += 1
        # a deleted chunk file reads back as the NaN fill value instead of failing
        if self._done[k] and _has_nan(out):
            raise CacheError(f"chunk {k} of {self.path}/logits is marked done but holds NaN (file missing?)",
                             _verify_hint(self._attrs))
        return out


def _has_nan(chunk: np.ndarray) -> bool:
    if chunk.dtype == np.float16:  # np.isnan is slow on float16; a NaN's bits are exponent all ones, mantissa not 0
        return bool(((chunk.view(np.uint16) & 0x7FFF) > 0x7C00).any())
    return bool(np.isnan(chunk).any())


def align_rows(cache_ids: np.ndarray, wanted: Sequence[str], path: str, attrs: dict[str, Any]) -> np.ndarray:
    """Cache row (int64) of each id in `wanted`; every id must be cached exactly once."""
    cached = np.asarray(cache_ids).tolist()
    # hash to int64 so sorting and searching are numeric; strings are compared afterwards, so a collision
    # can never map an id to the wrong row
    keys = np.fromiter(map(hash, cached), dtype=np.int64, count=len(cached))
    order = np.argsort(keys)
    sorted_keys = keys[order]
    if len(sorted_keys) and (sorted_keys[1:] == sorted_keys[:-1]).any():
        rows = _align_by_dict(cached, wanted, path)
    else:
        query = np.fromiter(map(hash, wanted), dtype=np.int64, count=len(wanted))
        slot = np.minimum(np.searchsorted(sorted_keys, query), max(len(sorted_keys) - 1, 0))
        rows = order[slot] if len(order) else np.full(len(wanted), -1, dtype=np.int64)
        found = sorted_keys[slot] == query if len(order) else np.zeros(len(wanted), dtype=bool)
        same = np.array(cached, dtype=object)[rows[found]] == np.array(wanted, dtype=object)[found]
        found[np.flatnonzero(found)[~same]] = False
        rows = np.where(found, rows, -1)
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        shown = ", ".join(repr(wanted[i]) for i in missing[:_SHOW_MISSING].tolist())
        raise CacheError(f"{missing.size} of {len(wanted)} dataset samples are not in the cache {path}, "
                         f"e.g. {shown}",
                         f"cache this dataset with: kdtrack cache-logits --teacher-run-id "
                         f"{attrs.get('teacher_run_id', '<teacher run id>')} ..., or select only cached samples")
    return rows.astype(np.int64, copy=False)


def _align_by_dict(cached: list[str], wanted: Sequence[str], path: str) -> np.ndarray:
    """Slower exact path, taken only when two cache ids share a hash (or an id is stored twice)."""
    index = {sid: row for row, sid in enumerate(cached)}
    if len(index) != len(cached):
        raise CacheError(f"{path}/sample_ids holds {len(cached) - len(index)} duplicate ids",
                         "the store is corrupt; rebuild it with kdtrack cache-logits")
    return np.fromiter((index.get(sid, -1) for sid in wanted), dtype=np.int64, count=len(wanted))


def _open_group(path: str) -> zarr.Group:
    try:
        return zarr.open_group(path, mode="r")
    except (OSError, ValueError) as exc:  # zarr's not-found and not-a-group errors derive from these
        raise CacheError(f"{path} is not a readable zarr group ({exc})",
                         "pass the path of a logits.zarr written by kdtrack cache-logits") from exc


def _read_whole(group: zarr.Group, name: str, path: str, attrs: dict[str, Any]) -> np.ndarray:
    try:
        return np.asarray(group[name][:])
    except ValueError as exc:  # a Crc32c mismatch in the ids, labels or done flags
        raise CacheError(f"{path}/{name} is corrupt ({exc})", _verify_hint(attrs)) from exc


def _check_attrs(path: str, attrs: dict[str, Any], expected_digest: str | None, require_complete: bool) -> None:
    fmt = attrs.get("format")
    if fmt != STORE_FORMAT:
        raise CacheError(f"{path} is not a kdtrack logit cache (format {fmt!r}, expected {STORE_FORMAT!r})",
                         "pass a logits.zarr written by kdtrack cache-logits, or rebuild it with this version")
    if require_complete and attrs.get("complete") is not True:
        raise CacheError(f"the cache {path} is incomplete (not every chunk is written and verified)",
                         f"finish it with: kdtrack cache-logits --teacher-run-id {attrs.get('teacher_run_id', '?')} "
                         "... (resumes at the first unwritten chunk), or kdtrack verify-cache --run-id "
                         "<cache run id> if all chunks are written")
    stored = str(attrs.get("dataset_digest", ""))
    if expected_digest is not None and stored != expected_digest:
        raise CacheError(f"the cache {path} is for dataset {stored[:12]}, not for this dataset "
                         f"{expected_digest[:12]}",
                         "cache this dataset's logits with kdtrack cache-logits, or load the dataset it was built for")


def _check_layout(path: str, group: zarr.Group, attrs: dict[str, Any], require_complete: bool) -> None:
    absent = [name for name in _ARRAYS if not isinstance(group.get(name), zarr.Array)]
    if absent:
        raise CacheError(f"the cache {path} has no array {absent[0]!r}", "rebuild it with kdtrack cache-logits")
    logits = group["logits"]
    n = logits.shape[0] if logits.ndim else 0
    chunk_rows = int(logits.chunks[0]) if logits.ndim else 0
    problems = []
    if logits.ndim < 2 or np.dtype(logits.dtype) not in _DTYPES:
        problems.append(f"logits are {logits.dtype} {logits.shape}, need float16/float32 (N, *output_shape)")
    for name in ("sample_ids", "labels"):
        if group[name].shape != (n,):
            problems.append(f"{name} has shape {group[name].shape}, need ({n},)")
    if chunk_rows and group["chunk_done"].shape != (math.ceil(n / chunk_rows),):
        problems.append(f"chunk_done has shape {group['chunk_done'].shape} for {n} rows in chunks of {chunk_rows}")
    for key, actual in (("num_rows", n), ("chunk_rows", chunk_rows), ("output_shape", list(logits.shape[1:]))):
        if key in attrs and attrs[key] != actual:
            problems.append(f"attribute {key}={attrs[key]!r} but the arrays say {actual!r}")
    if not problems and require_complete and not _read_whole(group, "chunk_done", path, attrs).all():
        problems.append("it is marked complete but chunk_done has unfinished chunks")
    if problems:
        raise CacheError(f"the cache {path} is inconsistent: {'; '.join(problems)}", _verify_hint(attrs))


class ChunkAwareSampler(Sampler[int]):
    """Table rows in an epoch order that visits store chunks in a shuffled order, `window_chunks` at a time.

    Rows are shuffled within each window of chunks, so a chunked LogitTable holding at least `window_chunks`
    chunks reads each chunk about once per epoch. Call `set_epoch(epoch)` before each epoch.
    """

    def __init__(
        self,
        table_or_chunk_of_rows: LogitTable | np.ndarray | Sequence[int],
        seed: int,
        window_chunks: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if isinstance(table_or_chunk_of_rows, LogitTable):
            table = table_or_chunk_of_rows
            chunks = table.chunk_of(np.arange(table.num_rows))
            default = _DEFAULT_WINDOW if table.in_memory else min(_DEFAULT_WINDOW, table.max_resident_chunks)
        else:
            chunks, default = np.asarray(table_or_chunk_of_rows, dtype=np.int64), _DEFAULT_WINDOW
        self.window_chunks = default if window_chunks is None else int(window_chunks)
        if self.window_chunks < 1:
            raise ValueError(f"window_chunks is {self.window_chunks}; use a positive number of chunks, e.g. 4")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}; pass torchrun's rank and world size")
        self._chunk_ids, self._chunk_slot = np.unique(chunks, return_inverse=True)
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def permutation(self) -> torch.Tensor:
        """The row order of the current epoch (int64); depends only on (seed, epoch)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, self.epoch % 2**64]))
        chunk_rank = rng.permutation(len(self._chunk_ids))
        window = chunk_rank[self._chunk_slot] // self.window_chunks
        # window-major order, uniformly shuffled within a window: the fraction breaks ties inside a window
        return torch.from_numpy(np.argsort(window + rng.random(len(window)), kind="stable"))

    def __iter__(self) -> Iterator[int]:
        order = self.permutation()
        if self.world > 1:  # every world-th row of the one epoch order (padded by its first rows), as for DDP
            n = len(order)
            order = order[torch.arange(len(self) * self.world) % max(n, 1)][self.rank::self.world]
        return iter(order.tolist())

    def __len__(self) -> int:
        return -(-len(self._chunk_slot) // self.world)  # rows per rank
