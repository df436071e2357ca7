"""Cache build: schema, determinism, kill -9 resume, prior-row copy, recreation, dtypes, signals, OOM halving."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cache_build_child import (BATCH, CHUNK_ROWS, N_ROWS, NUM_CLASSES, build_tiny_cache, tiny_attrs, tiny_dataset,
                               tiny_model)
from conftest import subprocess_env
from torch import nn

from kdtrack.cache import (FORMAT, PriorRows, build, cache_key, default_chunk_rows, mark_complete, open_store,
                           probe_output_shape, store_nbytes)
from kdtrack.cache import writer as writer_module
from kdtrack.errors import BadInput, CacheError

CPU = torch.device("cpu")
HERE = Path(__file__).resolve().parent


def build_tiny(path: Path, ds=None, model=None, **kw):
    ds = tiny_dataset() if ds is None else ds
    if "attrs" not in kw:
        kw["attrs"] = tiny_attrs(ds, dtype=kw.get("dtype", "float32"))
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("chunk_rows", CHUNK_ROWS)
    kw.setdefault("progress", False)
    return build(path, tiny_model() if model is None else model, ds, device=CPU, **kw)


def forward_chunked(model: nn.Module, ds, rows: range, batch: int = BATCH) -> np.ndarray:
    """The teacher's outputs computed independently of kdtrack.cache, batches aligned to `rows.start`."""
    with torch.inference_mode():
        return np.concatenate([model(ds.batch(list(rows[i:i + batch]))[0]).numpy() for i in range(0, len(rows), batch)])


def raw(path: Path, name: str = "logits") -> np.ndarray:
    values = zarr.open_group(path, mode="r")[name][:]
    return values.view(np.uint8) if values.dtype.kind == "f" else values


# ---------------------------------------------------------------- schema


def test_store_round_trip_reads_with_plain_zarr(tmp_path: Path) -> None:
    ds, model = tiny_dataset(), tiny_model()
    stats = build_tiny(tmp_path / "c.zarr", ds, model)
    assert (stats.rows_computed, stats.rows_copied, stats.chunks_written) == (N_ROWS, 0, N_ROWS // CHUNK_ROWS)

    group = zarr.open_group(tmp_path / "c.zarr", mode="r")  # plain zarr, no kdtrack
    attrs = dict(group.attrs)
    assert attrs["format"] == FORMAT == "kdtrack.logits/2"
    assert (attrs["num_rows"], attrs["chunk_rows"], attrs["output_shape"], attrs["num_classes"]) == (512, 32, [5], 5)
    assert (attrs["dtype"], attrs["complete"], attrs["initialised"]) == ("float32", False, True)
    assert attrs["fidelity"] is None and attrs["num_classes"] == NUM_CLASSES
    assert attrs["normalisation"] == {"mean": 0.5, "std": 2.0} and attrs["cache_key"] == tiny_attrs(ds)["cache_key"]
    assert set(attrs) == {"format", "teacher_run_id", "checkpoint_sha256", "dataset_digest", "cache_key", "num_classes",
                          "output_shape", "dtype", "splits", "chunk_rows", "num_rows", "normalisation", "model_spec",
                          "complete", "initialised", "created_at", "kdtrack_version", "fidelity"}
    logits = group["logits"]
    assert logits.shape == (512, 5) and logits.chunks == (32, 5) and logits.dtype == np.float32
    assert group["chunk_done"].chunks == (1,) and group["chunk_done"][:].all()
    assert group["sample_ids"].chunks == group["labels"].chunks == (32,)
    assert all("crc32c" in str(group[name].metadata.to_dict()["codecs"]) for name in ("logits", "sample_ids", "labels"))
    assert group["sample_ids"][:].tolist() == ds.sample_ids
    ids_utf8 = group["sample_ids_utf8"][:]  # (512, 8): "tiny/511" is the longest id
    assert ids_utf8.shape == (512, 8) and [bytes(r).rstrip(b"\0").decode() for r in ids_utf8] == ds.sample_ids
    assert {name: group[name].metadata.dimension_names for name in group.array_keys()} == {
        "logits": ("row", "class"), "sample_ids": ("row",), "sample_ids_utf8": ("row", "byte"),
        "labels": ("row",), "chunk_done": ("chunk",)}
    np.testing.assert_array_equal(group["labels"][:], ds.labels)
    # chunk-aligned batches of the model's own forward give exactly the cached numbers
    expected = np.concatenate([forward_chunked(model, ds, range(s, s + CHUNK_ROWS)) for s in range(0, 512, CHUNK_ROWS)])
    np.testing.assert_array_equal(logits[:], expected)
    with torch.inference_mode():  # and one whole-dataset forward agrees to rounding, with normalisation applied
        x = torch.from_numpy((ds.features - 0.5) / 2.0)
        np.testing.assert_allclose(logits[:], model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_cache_key_is_canonical_and_sensitive() -> None:
    base = dict(checkpoint_sha256="a" * 64, dataset_digest="b" * 64, splits=["train", "val"], dtype="float16",
                output_shape=[10], normalisation={"mean": 0.1, "std": 2.0})
    key = cache_key(**base)
    assert len(key) == 64 and key == cache_key(**{**base, "splits": ["val", "train"]})
    changes = [("checkpoint_sha256", "c" * 64), ("dataset_digest", "d" * 64), ("splits", ["train"]),
               ("dtype", "float32"), ("output_shape", [10, 1]), ("normalisation", {"mean": 0.1, "std": 2.5}),
               ("normalisation", None), ("topk", 5)]
    keys = {cache_key(**{**base, field: value}) for field, value in changes}
    assert len(keys) == len(changes) and key not in keys
    with pytest.raises(BadInput, match="bfloat16"):
        cache_key(**{**base, "dtype": "bfloat16"})


def test_default_chunk_rows_targets_four_mib() -> None:
    assert default_chunk_rows([100], "float16") == 20736  # 4 MiB / 200 B = 20971 rows, down to a multiple of 256
    assert default_chunk_rows([10], "float32") == 104704  # 4 MiB / 40 B = 104857
    assert default_chunk_rows([4096, 64], "float32") == 4  # 1 MiB rows: 4 MiB holds 4, no 256-row floor
    assert default_chunk_rows([4096, 1024], "float32") == 1  # a 16 MiB row: one row a chunk


# ---------------------------------------------------------------- determinism and resume


def test_two_builds_are_bit_identical(tmp_path: Path) -> None:
    build_tiny(tmp_path / "a.zarr", batch_size=16)
    build_tiny(tmp_path / "b.zarr", batch_size=16)
    assert np.array_equal(raw(tmp_path / "a.zarr"), raw(tmp_path / "b.zarr"))


# Die inside zarr's atomic write of one object: its bytes are in `<key>.<uuid>.partial`, not yet renamed into place.
# tests/test_faults.py kills just *before* each write; a SIGKILL at a random moment can also land in here.
_KILLED_MID_WRITE = """
import contextlib, os, signal, sys
import torch
from zarr.storage import _local
from cache_build_child import build_tiny_cache
from fault_child import store_key

path, key = sys.argv[1:3]
atomic_write = _local._atomic_write

@contextlib.contextmanager
def dying(target, mode, exclusive=False):
    with atomic_write(target, mode, exclusive) as handle:
        yield handle
        if store_key(target) == key:
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

_local._atomic_write = dying
torch.set_num_threads(1)
build_tiny_cache(path)
"""


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path, less the creation time in the group's metadata."""
    files = {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file()}
    group = json.loads(files.pop("zarr.json"))
    del group["attributes"]["created_at"]
    return {**files, "zarr.json": json.dumps(group, sort_keys=True).encode()}


@pytest.mark.slow  # each kill is a build in a process of its own (imports torch)
@pytest.mark.parametrize("key", ["logits/c/5/0", "chunk_done/c/5"])
def test_sigkill_inside_a_write_then_resume_is_bit_identical(tmp_path: Path, key: str) -> None:
    path, total = tmp_path / "killed.zarr", N_ROWS // CHUNK_ROWS
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(path), key], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    (partial,) = path.glob(f"{key}.*.partial")  # the object's new bytes, never renamed into place
    assert zarr.open_group(path, mode="r")["chunk_done"][:].tolist() == [c < 5 for c in range(total)]

    stats = build_tiny_cache(path)  # resume in this process
    assert (stats.chunks_written, stats.rows_computed, stats.rows_copied) == (total - 5, (total - 5) * CHUNK_ROWS, 0)
    build_tiny_cache(tmp_path / "clean.zarr")
    resumed, clean = _files(path), _files(tmp_path / "clean.zarr")
    # every object of a clean build, with the same bytes; nothing of the dead write is read as data
    assert {k: v for k, v in resumed.items() if k in clean} == clean
    assert sorted(set(resumed) - set(clean)) == [] and not partial.exists()  # the dead write's temp file is gone


class _BatchMix(nn.Module):
    """Each row's output depends on its batch-mates, so any change in batch boundaries changes the numbers."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + 0.1 * y.mean(dim=0, keepdim=True)


def test_chunk_subsets_fill_one_store_as_one_build_would(tmp_path: Path) -> None:
    path, model = tmp_path / "ranks.zarr", _BatchMix(tiny_model())
    # batch 12 does not divide 32-row chunks: only chunk-aligned batches make the subsets agree with one build
    assert build_tiny(path, model=model, batch_size=12, chunks=[]).chunks_written == 0  # only creates the store
    assert build_tiny(path, model=model, batch_size=12, chunks=range(0, 16, 2)).chunks_written == 8
    assert build_tiny(path, model=model, batch_size=12, chunks=range(1, 16, 2)).chunks_written == 8
    assert build_tiny(path, model=model, batch_size=12).chunks_written == 0
    build_tiny(tmp_path / "all.zarr", model=model, batch_size=12)
    assert np.array_equal(raw(path), raw(tmp_path / "all.zarr"))
    for bad in (16, -1):
        with pytest.raises(BadInput, match=rf"chunks \[{bad}\] are outside this store's 0\.\.15"):
            build_tiny(path, chunks=[bad, 3])


def test_a_build_removes_only_the_dead_writes_of_its_own_chunks(tmp_path: Path) -> None:
    """Temporary `<key>.<uuid>.partial` files a killed write left go when their chunk is written again; those of
    chunks this call does not write (another writer's) stay."""
    path = tmp_path / "c.zarr"
    build_tiny(path, chunks=[])  # created, nothing computed
    dead = {c: [path / "logits" / "c" / str(c) / "0.0f3a.partial", path / "chunk_done" / "c" / f"{c}.9b1e.partial"]
            for c in (1, 5, 15)}  # chunk 1's flag prefix "1." must not reach chunk 15's
    for files in dead.values():
        for f in files:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"half")
    assert build_tiny(path, chunks=[1, 5]).chunks_written == 2
    assert {c: [f.exists() for f in files] for c, files in dead.items()} == {1: [False, False], 5: [False, False],
                                                                           15: [True, True]}
    assert zarr.open_group(path, mode="r")["chunk_done"][:].tolist() == [c in (1, 5) for c in range(16)]


def test_a_build_writes_ids_and_labels_only_when_creating_the_store(tmp_path: Path) -> None:
    """Sample ids and labels are written once, when the store is created; filling chunks writes logits and flags only
    (zarr replaces an object it writes, so a rewritten one has a new inode)."""
    path = tmp_path / "c.zarr"
    build_tiny(path, tiny_dataset(64), chunks=[])
    objects = [path / "sample_ids" / "c" / "0", path / "labels" / "c" / "0", path / "logits" / "c" / "0" / "0"]
    before = [os.stat(f).st_ino if f.exists() else None for f in objects]
    build_tiny(path, tiny_dataset(64))
    after = [os.stat(f).st_ino for f in objects]
    assert after[:2] == before[:2] and before[2] is None


def test_nothing_to_do_reports_zero_work(tmp_path: Path) -> None:
    """A build whose chunks are all done writes nothing and says so: zero rows and chunks, zero rate, the batch size
    asked for, and only the time the call took."""
    build_tiny(tmp_path / "c.zarr")
    before = time.perf_counter()
    stats = build_tiny(tmp_path / "c.zarr", batch_size=16)
    took = time.perf_counter() - before
    assert (stats.rows_computed, stats.rows_copied, stats.chunks_written, stats.rows_per_s,
            stats.batch_size_used) == (0, 0, 0, 0.0, 16)
    assert 0 < stats.seconds <= took


def test_rate_counts_computed_rows_only(tmp_path: Path) -> None:
    """`rows_per_s` is computed rows over the call's seconds; a build that only copies prior rows has rate 0."""
    before = time.perf_counter()
    stats = build_tiny(tmp_path / "c.zarr", tiny_dataset(64))
    took = time.perf_counter() - before
    assert 0 < stats.seconds <= took
    assert stats.rows_computed == 64 and stats.rows_per_s == pytest.approx(64 / stats.seconds)
    mark_complete(open_store(tmp_path / "c.zarr", "r+"), None)
    copied = build_tiny(tmp_path / "d.zarr", tiny_dataset(64), prior=PriorRows(tmp_path / "c.zarr", 64))
    assert (copied.rows_copied, copied.rows_computed, copied.rows_per_s) == (64, 0, 0.0)


def test_rewriting_a_complete_store_clears_complete(tmp_path: Path) -> None:
    """`complete` stays true while a build has nothing to write and turns false once a chunk is rewritten."""
    path = tmp_path / "c.zarr"
    build_tiny(path, tiny_dataset(64))
    mark_complete(open_store(path, "r+"), None)
    build_tiny(path, tiny_dataset(64))
    assert zarr.open_group(path, mode="r").attrs["complete"] is True
    build_tiny(path, tiny_dataset(64), chunks=[1], force_chunks=True)
    assert zarr.open_group(path, mode="r").attrs["complete"] is False


def test_progress_bar_ends_at_the_row_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar is named after the store, counts rows, and ends at exactly the rows written: copied prior rows
    included, rows of a batch that ran out of memory not counted twice."""
    new = tiny_dataset(96)
    build_tiny(tmp_path / "old.zarr", new.take(np.arange(40)))
    mark_complete(open_store(tmp_path / "old.zarr", "r+"), None)
    capsys.readouterr()
    # rows 0..39 copied; the 4th forward (rows 56..63, after the probe, rows 40..47 and 48..55) runs out of memory
    stats = build_tiny(tmp_path / "new.zarr", new, _OomOnCall(tiny_model(), 4), batch_size=8, progress=True,
                       prior=PriorRows(tmp_path / "old.zarr", 40))
    assert (stats.rows_copied, stats.batch_size_used) == (40, 4)
    final = capsys.readouterr().err.split("\r")[-1]
    assert final.startswith("cache new.zarr 100%|") and " 96/96 [" in final and " rows/s" in final, final


def test_progress_bar_takes_back_only_the_rows_of_the_block_that_ran_out_of_memory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Blocks of 16 rows (the first batch size) in chunks of 32; forwards 2, 6 and 13 run out of memory (1 is the
    probe): at none, one and two finished batches of their block (0 at 16 rows; 16..23 done at 8; 32..39 done at
    4). The bar ends at exactly the row count, and the store is the model's outputs."""
    model = _OomOnCalls(tiny_model(), {2, 6, 13})
    stats = build_tiny(tmp_path / "o.zarr", tiny_dataset(64), model, batch_size=16, progress=True)
    assert model.sizes == [1, 16, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4] + [2] * 16  # blocks 32..47 and 48..63 at 2
    assert stats.batch_size_used == 2 and stats.rows_computed == 64
    final = capsys.readouterr().err.split("\r")[-1]
    assert " 64/64 [" in final, final
    build_tiny(tmp_path / "ref.zarr", tiny_dataset(64), batch_size=2)
    assert np.array_equal(raw(tmp_path / "o.zarr"), raw(tmp_path / "ref.zarr"))


class _OomOnCalls(nn.Module):
    """Records each batch size; raises the CUDA out-of-memory error on the given forward calls (1-based)."""

    def __init__(self, inner: nn.Module, calls: set[int]) -> None:
        super().__init__()
        self.inner, self.calls, self.sizes = inner, calls, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if len(self.sizes) in self.calls:
            raise _cuda_oom(x.shape[0])
        return self.inner(x)


class _OomOnCall(nn.Module):
    """Raises the CUDA out-of-memory error on its `call`-th forward only."""

    def __init__(self, inner: nn.Module, call: int) -> None:
        super().__init__()
        self.inner, self.call, self.calls = inner, call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.call:
            raise _cuda_oom(x.shape[0])
        return self.inner(x)


def test_prior_rows_are_copied_and_only_new_rows_computed(tmp_path: Path) -> None:
    new = tiny_dataset(400)
    old = new.take(np.arange(300))
    build_tiny(tmp_path / "old.zarr", old, chunk_rows=64)
    mark_complete(open_store(tmp_path / "old.zarr", "r+"), None)

    counter = _RowCounter(tiny_model())
    stats = build_tiny(tmp_path / "new.zarr", new, counter, chunk_rows=64, prior=PriorRows(tmp_path / "old.zarr", 300))
    assert (stats.rows_copied, stats.rows_computed, stats.chunks_written) == (300, 100, 7)
    assert counter.rows == 100 + 1  # the new rows, plus the one-row shape probe
    build_tiny(tmp_path / "full.zarr", new, chunk_rows=64)
    got, full = (zarr.open_group(tmp_path / name)["logits"][:] for name in ("new.zarr", "full.zarr"))
    assert np.array_equal(got[:300].view(np.uint8), full[:300].view(np.uint8))
    with torch.inference_mode():
        np.testing.assert_allclose(got[300:], tiny_model()(new.batch(list(range(300, 400)))[0]).numpy(), atol=1e-6)

    shuffled = new.take(np.r_[1, 0, 2:400])
    with pytest.raises(BadInput, match="other sample ids"):
        build_tiny(tmp_path / "bad.zarr", shuffled, chunk_rows=64, prior=PriorRows(tmp_path / "old.zarr", 300))


def _complete_prior(path: Path, ds, model: nn.Module) -> None:
    """A complete 32-row-chunk store of `model` over `ds` at `path`, as a prior for a longer dataset."""
    build_tiny(path, ds, model)
    mark_complete(open_store(path, "r+"), None)


@pytest.mark.parametrize("rows", [0, 40, 64])
def test_prior_copies_exactly_its_leading_rows(tmp_path: Path, rows: int) -> None:
    """Rows below `prior.rows` hold the prior store's numbers, the rest the new model's; 0 and all rows are allowed."""
    new = tiny_dataset(96)
    old_model, new_model = tiny_model(seed=0), tiny_model(seed=1)  # different numbers show where each row came from
    _complete_prior(tmp_path / "old.zarr", new.take(np.arange(64)), old_model)
    stats = build_tiny(tmp_path / "new.zarr", new, new_model, prior=PriorRows(tmp_path / "old.zarr", rows))
    assert (stats.rows_copied, stats.rows_computed) == (rows, 96 - rows)
    got = zarr.open_group(tmp_path / "new.zarr", mode="r")["logits"][:]
    old = zarr.open_group(tmp_path / "old.zarr", mode="r")["logits"][:]
    np.testing.assert_array_equal(got[:rows], old[:rows])
    with torch.inference_mode():
        np.testing.assert_allclose(got[rows:], new_model(new.batch(list(range(rows, 96)))[0]).numpy(), atol=1e-6)
        assert not np.allclose(got[rows:], old_model(new.batch(list(range(rows, 96)))[0]).numpy(), atol=1e-3)


@pytest.mark.parametrize(("rows", "new_rows"), [(-1, 96), (65, 96), (64, 48)])
def test_prior_rows_beyond_the_prior_or_the_dataset_are_refused(tmp_path: Path, rows: int, new_rows: int) -> None:
    """`prior.rows` must lie in 0..min(prior store rows, dataset rows); here the prior store has 64."""
    rows96 = tiny_dataset(96)
    _complete_prior(tmp_path / "old.zarr", rows96.take(np.arange(64)), tiny_model())
    new = rows96.take(np.arange(new_rows))
    with pytest.raises(BadInput, match=rf"prior rows {rows} exceed the prior store \(64\) or the dataset "
                                       rf"\({new_rows}\)"):
        build_tiny(tmp_path / "new.zarr", new, prior=PriorRows(tmp_path / "old.zarr", rows))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("complete", False, "is not complete"),
    ("checkpoint_sha256", "ckpt9", r"is different in \['checkpoint_sha256'\]"),
    ("normalisation", {"mean": 0.0, "std": 1.0}, r"is different in \['normalisation'\]"),
    ("dtype", "float16", r"is different in \['dtype'\]"),
    ("output_shape", [6], r"is different in \['output_shape'\]"),
])
def test_prior_must_be_a_complete_store_of_the_same_teacher(tmp_path: Path, field: str, value: object,
                                                            message: str) -> None:
    """A prior store that is unfinished, or differs in checkpoint, normalisation, dtype or output shape, is refused."""
    new = tiny_dataset(96)
    _complete_prior(tmp_path / "old.zarr", new.take(np.arange(64)), tiny_model())
    zarr.open_group(tmp_path / "old.zarr", mode="r+").update_attributes({field: value})  # plain zarr, no kdtrack
    with pytest.raises(BadInput, match=message):
        build_tiny(tmp_path / "new.zarr", new, prior=PriorRows(tmp_path / "old.zarr", 64))


class _RowCounter(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.inner(x)


def test_key_change_or_no_resume_recreates_the_store(tmp_path: Path) -> None:
    path, ds = tmp_path / "c.zarr", tiny_dataset()
    build_tiny(path)
    assert build_tiny(path).chunks_written == 0  # same key: nothing to do
    other = tiny_attrs(ds, checkpoint="ckpt1")
    assert build_tiny(path, model=tiny_model(seed=1), attrs=other).chunks_written == 16
    group = zarr.open_group(path, mode="r")
    assert group.attrs["cache_key"] == other["cache_key"] and group.attrs["checkpoint_sha256"] == "ckpt1"
    with torch.inference_mode():  # every row now holds the second teacher's numbers
        np.testing.assert_allclose(group["logits"][:], tiny_model(seed=1)(ds.batch(list(range(512)))[0]).numpy(),
                                   atol=1e-6)
    assert build_tiny(path, model=tiny_model(seed=1), attrs=other, resume=False).chunks_written == 16


@pytest.mark.parametrize(("rows", "out", "chunk_rows"), [
    (64, 5, 64),  # 4 MiB would be 209664 rows of 20 B: capped at the 64 rows there are
    (1100, 1024, 1024),  # 4 MiB / 4096 B a row = 1024 rows, a multiple of 256
])
def test_default_chunks_hold_about_4_mib_but_never_more_rows_than_the_store(tmp_path: Path, rows: int, out: int,
                                                                             chunk_rows: int) -> None:
    """Without `chunk_rows` a store gets ~4 MiB chunks, never more rows per chunk than it has rows."""
    ds = tiny_dataset(rows)
    build_tiny(tmp_path / "c.zarr", ds, tiny_model(out=out), attrs=tiny_attrs(ds, (out,)), chunk_rows=None)
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert group.attrs["chunk_rows"] == chunk_rows and group["logits"].chunks == (chunk_rows, out)
    assert group["chunk_done"][:].all()
    # resuming without chunk_rows takes the store's own
    assert build_tiny(tmp_path / "c.zarr", ds, tiny_model(out=out), attrs=tiny_attrs(ds, (out,)),
                      chunk_rows=None).chunks_written == 0


def test_an_explicit_chunk_rows_above_the_row_count_is_capped_and_resumes(tmp_path: Path) -> None:
    """cache.chunk_rows=100000 on 64 rows gives one chunk of 64 rows (not 100000 padded ones), and a resume asking for
    the same 100000 takes that store as its own."""
    ds = tiny_dataset(64)
    assert build_tiny(tmp_path / "c.zarr", ds, chunk_rows=100_000).chunks_written == 1
    group = zarr.open_group(tmp_path / "c.zarr", mode="r")
    assert group.attrs["chunk_rows"] == 64 and group["logits"].chunks == (64, NUM_CLASSES)
    assert build_tiny(tmp_path / "c.zarr", ds, chunk_rows=100_000).chunks_written == 0
    with pytest.raises(BadInput, match="chunk_rows=32 but the store being resumed"):
        build_tiny(tmp_path / "c.zarr", ds, chunk_rows=32)


def test_a_store_never_fully_created_is_rebuilt_even_with_the_same_key(tmp_path: Path) -> None:
    """`initialised` false means the store is not to be trusted: a build recreates it rather than resuming it."""
    path, ds = tmp_path / "c.zarr", tiny_dataset(64)
    build_tiny(path, ds)
    zarr.open_group(path, mode="r+").update_attributes({"initialised": False})  # as a creation killed midway
    assert build_tiny(path, ds).chunks_written == 2
    assert zarr.open_group(path, mode="r").attrs["initialised"] is True


def test_refuses_to_delete_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a Zarr"):
        build_tiny(tmp_path / "mine", resume=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- outputs and storage


def _digits_train_rows():
    from conftest import DIGITS

    from kdtrack import config
    from kdtrack.data import build_dataset
    return build_dataset(config.load(DIGITS).data).select(["train"])


def _build_digits(path: Path, ds, dtype: str) -> None:
    """A cache of a linear 10-class teacher over the digits rows `ds` (no normalisation), default chunk_rows."""
    from kdtrack.data import dataset_digest
    digest = dataset_digest(ds)
    key = cache_key(checkpoint_sha256="ckpt0", dataset_digest=digest, splits=["train"], dtype=dtype,
                    output_shape=[10], normalisation=None)
    attrs = {"teacher_run_id": "run0", "checkpoint_sha256": "ckpt0", "dataset_digest": digest, "cache_key": key,
             "splits": ["train"], "normalisation": None, "model_spec": {"name": "linear"}}
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    build(path, model, ds, attrs=attrs, device=CPU, batch_size=512, dtype=dtype, progress=False)


def _expected_store_bytes(ids: list[str], rows_per_chunk: int, classes: int, itemsize: int) -> int:
    """Bytes of a store's chunk objects by the README's formula, counted by hand. Every array pads its last chunk to
    whole `rows_per_chunk` rows (padded ids are empty strings) and ends each chunk object in a 4-byte CRC32C."""
    chunks = -(-len(ids) // rows_per_chunk)
    rows = chunks * rows_per_chunk  # padded
    id_bytes = [len(sid.encode()) for sid in ids]
    logits = rows * classes * itemsize + 4 * chunks
    labels = rows * 8 + 4 * chunks
    ids_utf8 = rows * max(id_bytes) + 4 * chunks
    ids_vlen = 4 * chunks + 4 * rows + sum(id_bytes) + 4 * chunks  # per chunk a count, per row a length, then bytes
    flags = (1 + 4) * chunks
    return logits + labels + ids_utf8 + ids_vlen + flags


def _json_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in path.rglob("zarr.json"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_small_real_cache_takes_the_bytes_the_readme_formula_gives(tmp_path: Path, dtype: str) -> None:
    """The 1,259-row digits cache (10 classes) is one chunk of exactly its rows, and its size on disk is the README's
    formula: per sample 4·C (2·C for float16) + 8 (label) + 4 + len(id) (string id) + longest id (id bytes), per
    chunk 25 B of checksums, counts and flags, plus the JSON metadata."""
    ds = _digits_train_rows()
    assert len(ds) == 1259 and max(len(s) for s in ds.sample_ids) == len("digits/1796")
    _build_digits(tmp_path / "c.zarr", ds, dtype)
    assert zarr.open_group(tmp_path / "c.zarr", mode="r").attrs["chunk_rows"] == 1259
    itemsize = 4 if dtype == "float32" else 2
    data = _expected_store_bytes(ds.sample_ids, 1259, 10, itemsize)
    assert store_nbytes(tmp_path / "c.zarr") == data + _json_bytes(tmp_path / "c.zarr")
    mean_id = sum(len(s) for s in ds.sample_ids) / 1259
    assert data / 1259 == pytest.approx(10 * itemsize + 8 + 4 + mean_id + 11 + 25 / 1259)
    assert _json_bytes(tmp_path / "c.zarr") < 4096


def test_a_float16_cache_is_smaller_than_a_float32_one_by_the_logit_bytes(tmp_path: Path) -> None:
    ds = _digits_train_rows()
    sizes = {}
    for dtype in ("float32", "float16"):
        _build_digits(tmp_path / dtype, ds, dtype)
        sizes[dtype] = store_nbytes(tmp_path / dtype) - _json_bytes(tmp_path / dtype)
    assert sizes["float32"] - sizes["float16"] == 1259 * 10 * 2  # two bytes less per logit, nothing else differs


def test_a_padded_last_chunk_is_counted_by_the_formula(tmp_path: Path) -> None:
    """70 rows in chunks of 32: three chunks, the last padded by 26 rows in every array."""
    ds = tiny_dataset(70)
    build_tiny(tmp_path / "c.zarr", ds)
    assert store_nbytes(tmp_path / "c.zarr") == (_expected_store_bytes(ds.sample_ids, 32, NUM_CLASSES, 4)
                                                 + _json_bytes(tmp_path / "c.zarr"))


def test_float16_storage_halves_the_logit_bytes(tmp_path: Path) -> None:
    ds, model = tiny_dataset(), tiny_model(out=64)
    build_tiny(tmp_path / "f32.zarr", ds, model, attrs=tiny_attrs(ds, (64,)))
    build_tiny(tmp_path / "f16.zarr", ds, model, dtype="float16", attrs=tiny_attrs(ds, (64,), "float16"))
    f32, f16 = (zarr.open_group(tmp_path / name)["logits"][:] for name in ("f32.zarr", "f16.zarr"))
    assert f16.dtype == np.float16 and np.array_equal(f16, f32.astype(np.float16))
    ratio = store_nbytes(tmp_path / "f16.zarr" / "logits") / store_nbytes(tmp_path / "f32.zarr" / "logits")
    assert 0.45 < ratio < 0.55, ratio


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_mixed_precision_forward_uses_the_given_dtype(tmp_path: Path, amp: torch.dtype) -> None:
    """With `amp_dtype` the teacher runs under autocast in that dtype; the cache holds those numbers as float32."""
    ds, model = tiny_dataset(64), tiny_model()
    build_tiny(tmp_path / "a.zarr", ds, model, amp_dtype=amp)
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp):
        expected = np.concatenate([model(ds.batch(list(range(s, s + BATCH)))[0]).float().numpy()
                                   for s in range(0, 64, BATCH)])
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "a.zarr", mode="r")["logits"][:], expected)


def test_signal_outputs_are_cached(tmp_path: Path) -> None:
    ds = tiny_dataset(100)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Unflatten(1, (4, 3))).eval()  # (B, T=4, ch=3)
    build_tiny(tmp_path / "s.zarr", ds, model, attrs=tiny_attrs(ds, (4, 3)))
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group.attrs["output_shape"] == [4, 3] and group.attrs["num_classes"] is None
    assert group["logits"].shape == (100, 4, 3) and group["logits"].chunks == (32, 4, 3)
    with torch.inference_mode():
        np.testing.assert_allclose(group["logits"][:], model(ds.batch(list(range(100)))[0]).numpy(), atol=1e-6)


def _cuda_oom(rows: int) -> RuntimeError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows")


def _cpu_oom(rows: int) -> RuntimeError:
    """What PyTorch's CPU allocator raises: a plain RuntimeError, told apart only by its text."""
    return RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                        f"you tried to allocate {rows * 4096} bytes. Error code 12 (Cannot allocate memory)")


class _OomAbove(nn.Module):
    """Raises `error(rows)` (default: the CUDA out-of-memory error) for batches larger than `limit`."""

    def __init__(self, inner: nn.Module, limit: int, error: Callable[[int], RuntimeError] = _cuda_oom) -> None:
        super().__init__()
        self.inner, self.limit, self.error = inner, limit, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise self.error(x.shape[0])
        return self.inner(x)


def test_out_of_memory_halves_the_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = build_tiny(tmp_path / "o.zarr", model=_OomAbove(tiny_model(), 8), batch_size=64)
    assert stats.batch_size_used == 8 and stats.rows_computed == N_ROWS
    assert "out of memory" in capsys.readouterr().err
    build_tiny(tmp_path / "ref.zarr", batch_size=8)
    assert np.array_equal(raw(tmp_path / "o.zarr"), raw(tmp_path / "ref.zarr"))
    with pytest.raises(CacheError, match="batch size 1"):
        build_tiny(tmp_path / "never.zarr", model=_OomAbove(tiny_model(), 0), batch_size=4)


def test_cpu_allocator_failure_also_halves_the_batch(tmp_path: Path) -> None:
    """The CPU allocator's "can't allocate memory" RuntimeError is retried with smaller batches like a CUDA OOM."""
    stats = build_tiny(tmp_path / "o.zarr", model=_OomAbove(tiny_model(), 8, _cpu_oom), batch_size=32)
    assert stats.batch_size_used == 8 and stats.rows_computed == N_ROWS
    build_tiny(tmp_path / "ref.zarr", batch_size=8)
    assert np.array_equal(raw(tmp_path / "o.zarr"), raw(tmp_path / "ref.zarr"))


def test_other_runtime_errors_are_not_retried(tmp_path: Path) -> None:
    """A RuntimeError that is not out-of-memory reaches the caller unchanged, after one try at the full batch."""
    counter = _RowCounter(_OomAbove(tiny_model(), 8, lambda rows: RuntimeError(f"shapes mismatch at {rows} rows")))
    with pytest.raises(RuntimeError, match="^shapes mismatch at 32 rows$"):
        build_tiny(tmp_path / "e.zarr", model=counter, batch_size=32)
    assert counter.rows == 1 + 32  # the one-row shape probe, then the first batch only


@pytest.mark.parametrize(("message", "shown"), [
    ("CUDA out of memory. Tried to allocate 2.00 MiB\nGPU 0 has a total capacity of 79 GiB", "CUDA out of memory. "
     "Tried to allocate 2.00 MiB"),
    ("", "out of memory"),
])
def test_out_of_memory_at_batch_one_names_the_first_line_of_the_error(tmp_path: Path, message: str,
                                                                      shown: str) -> None:
    """Out of memory even for one row: a CacheError naming the device and the error's first line (or "out of memory")."""
    model = _OomAbove(tiny_model(), 0, lambda rows: torch.OutOfMemoryError(message))
    with pytest.raises(CacheError, match=f"^out of memory on cpu even at batch size 1 \\({re.escape(shown)}\\) — "):
        build_tiny(tmp_path / "never.zarr", model=model, batch_size=4)


class _OomFromCall(nn.Module):
    """Records each batch size; raises the CUDA out-of-memory error from its `call`-th forward on."""

    def __init__(self, inner: nn.Module, call: int) -> None:
        super().__init__()
        self.inner, self.call, self.sizes = inner, call, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if len(self.sizes) >= self.call:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows\nmore detail")
        return self.inner(x)


def test_out_of_memory_in_every_batch_gives_up_after_batch_one(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """After the probe, every forward runs out of memory: batches 4, 2 and 1 are tried, then a CacheError names the
    last error's first line."""
    model = _OomFromCall(tiny_model(), 2)
    with pytest.raises(CacheError, match=r"^out of memory on cpu even at batch size 1 \(CUDA out of memory\. "
                                         r"Tried to allocate 1 rows\) — "):
        build_tiny(tmp_path / "o.zarr", model=model, batch_size=4)
    assert model.sizes == [1, 4, 2, 1]
    err = capsys.readouterr().err
    assert "retrying rows 0..3 with batch size 2" in err and "retrying rows 0..3 with batch size 1" in err


def test_the_writer_thread_is_named(tmp_path: Path) -> None:
    """Chunks are written by a thread named `kdtrack-cache-writer` (as thread dumps show it), gone after the build."""
    seen: list[str] = []

    class Looking(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.extend(t.name for t in threading.enumerate())
            return tiny_model()(x)

    build_tiny(tmp_path / "t.zarr", tiny_dataset(64), Looking())
    assert "kdtrack-cache-writer" in seen
    assert not any(t.name == "kdtrack-cache-writer" for t in threading.enumerate())


def test_a_failed_write_of_the_last_chunk_still_reaches_the_caller(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails after the last chunk was queued is raised when the build ends, not lost."""
    class FullDisk:
        def __setitem__(self, key: object, value: object) -> None:
            raise OSError(28, "No space left on device")

    original = writer_module._ChunkWriter.__init__

    def broken_init(self, group, dataset=None) -> None:
        original(self, group, dataset)
        self.logits = FullDisk()

    build_tiny(tmp_path / "w.zarr", chunks=[])
    monkeypatch.setattr(writer_module._ChunkWriter, "__init__", broken_init)
    with pytest.raises(CacheError, match="^writing chunk 3 of the cache failed: .*No space left"):
        build_tiny(tmp_path / "w.zarr", chunks=[3])  # one chunk: nothing is queued after it
    assert not zarr.open_group(tmp_path / "w.zarr", mode="r")["chunk_done"][:].any()


def test_writer_thread_failure_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write is raised in the building thread, also when that thread is blocked on a full queue meanwhile;
    the writer thread is gone afterwards and no chunk is marked done."""
    class FullDisk:
        def __setitem__(self, key: object, value: object) -> None:
            time.sleep(0.3)  # a slow failure: the queue fills and the producer blocks before the error is known
            raise OSError(28, "No space left on device")

    original = writer_module._ChunkWriter.__init__

    def broken_init(self, group, dataset=None) -> None:
        original(self, group, dataset)
        self.logits = FullDisk()

    monkeypatch.setattr(writer_module._ChunkWriter, "__init__", broken_init)
    with pytest.raises(CacheError, match="No space left"):
        build_tiny(tmp_path / "w.zarr")
    assert not any(t.name == "kdtrack-cache-writer" for t in threading.enumerate())
    assert not zarr.open_group(tmp_path / "w.zarr", mode="r")["chunk_done"][:].any()


class _Returns(nn.Module):
    def __init__(self, shape_output) -> None:
        super().__init__()
        self.inner, self.shape_output = tiny_model(), shape_output

    def forward(self, x: torch.Tensor):
        return self.shape_output(self.inner(x))


@pytest.mark.parametrize(("shape_output", "got"), [
    (lambda y: (y,), "tuple"),
    (lambda y: y[:, 0], "(1,)"),
    (lambda y: y.repeat(2, 1), "(2, 5)"),
])
def test_a_teacher_output_that_is_not_one_tensor_per_sample_is_refused(tmp_path: Path, shape_output, got: str) -> None:
    """The one-row probe must return one tensor (1, *output_shape); anything else is named in the error."""
    with pytest.raises(BadInput, match=rf"^the teacher returned {re.escape(got)} for one sample, need a tensor"):
        build_tiny(tmp_path / "t.zarr", tiny_dataset(64), _Returns(shape_output))


def test_the_probe_runs_on_the_given_device() -> None:
    """The one-row shape probe moves its input to `device` (here PyTorch's data-less `meta` device)."""
    assert probe_output_shape(tiny_model(out=7).to("meta"), tiny_dataset(4), torch.device("meta")) == (7,)


def test_one_row_is_enough_and_no_rows_is_refused(tmp_path: Path) -> None:
    """A one-row dataset gives a one-row cache of the teacher's output for that row; an empty one is refused."""
    one = tiny_dataset(1)
    build_tiny(tmp_path / "one.zarr", one, chunk_rows=1)
    with torch.inference_mode():
        expected = tiny_model()(torch.from_numpy((one.features - 0.5) / 2.0)).numpy()
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "one.zarr", mode="r")["logits"][:], expected)
    empty = one.take(np.arange(0))
    with pytest.raises(BadInput, match="^cannot cache an empty dataset"):
        build_tiny(tmp_path / "none.zarr", empty, attrs=tiny_attrs(one))


def test_a_split_the_attrs_do_not_name_is_refused(tmp_path: Path) -> None:
    """Every split in the dataset must be among the attrs' recorded splits."""
    ds = tiny_dataset(64)
    ds.splits[5] = "val"
    with pytest.raises(BadInput, match=r"^the dataset holds splits \['val'\] that attrs splits \['train'\] do not name"):
        build_tiny(tmp_path / "c.zarr", ds, attrs=tiny_attrs(ds))


@pytest.mark.parametrize("key", ["splits", "normalisation"])
def test_attrs_without_splits_or_normalisation_are_refused(tmp_path: Path, key: str) -> None:
    """Attrs lacking the recorded splits or normalisation fail as incomplete attrs, naming the missing key."""
    ds = tiny_dataset(64)
    attrs = {k: v for k, v in tiny_attrs(ds).items() if k != key}
    with pytest.raises(BadInput, match=rf"^cache attrs lack \['{key}'\]"):
        build_tiny(tmp_path / "c.zarr", ds, attrs=attrs)


def test_bad_arguments_fail_loudly(tmp_path: Path) -> None:
    ds = tiny_dataset(64)
    with pytest.raises(BadInput, match="batch_size"):
        build_tiny(tmp_path / "a.zarr", ds, batch_size=0)
    assert build_tiny(tmp_path / "one.zarr", ds, batch_size=1).batch_size_used == 1  # the smallest valid size
    with pytest.raises(BadInput, match="normalisation"):
        build_tiny(tmp_path / "b.zarr", ds.with_normalisation(None), attrs=tiny_attrs(ds))
    build_tiny(tmp_path / "c.zarr", ds)
    with pytest.raises(BadInput, match=rf"^chunk_rows=16 but the store being resumed at {re.escape(str(tmp_path))}/c\.zarr "
                                       r"has 32"):
        build_tiny(tmp_path / "c.zarr", ds, chunk_rows=16)
    assert os.path.isdir(tmp_path / "c.zarr")
