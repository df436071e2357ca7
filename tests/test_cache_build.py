"""Cache build: schema, determinism, kill -9 resume, prior-row copy, recreation, dtypes, signals, OOM halving."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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
                           store_nbytes)
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
    return build(path, tiny_model() if model is None else model, ds, device=CPU, progress=False, **kw)


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
    assert attrs["format"] == FORMAT == "kdtrack.logits/1"
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
    assert default_chunk_rows([4096, 64], "float32") == 256  # 1 MiB rows: the floor


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
    with pytest.raises(BadInput, match="outside"):
        build_tiny(path, chunks=[16])


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


def test_refuses_to_delete_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a Zarr"):
        build_tiny(tmp_path / "mine", resume=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- outputs and storage


def test_float16_storage_halves_the_logit_bytes(tmp_path: Path) -> None:
    ds, model = tiny_dataset(), tiny_model(out=64)
    build_tiny(tmp_path / "f32.zarr", ds, model, attrs=tiny_attrs(ds, (64,)))
    build_tiny(tmp_path / "f16.zarr", ds, model, dtype="float16", attrs=tiny_attrs(ds, (64,), "float16"))
    f32, f16 = (zarr.open_group(tmp_path / name)["logits"][:] for name in ("f32.zarr", "f16.zarr"))
    assert f16.dtype == np.float16 and np.array_equal(f16, f32.astype(np.float16))
    ratio = store_nbytes(tmp_path / "f16.zarr" / "logits") / store_nbytes(tmp_path / "f32.zarr" / "logits")
    assert 0.45 < ratio < 0.55, ratio


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


class _OomAbove(nn.Module):
    """Raises the CUDA out-of-memory error for batches larger than `limit`."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows")
        return self.inner(x)


def test_out_of_memory_halves_the_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = build_tiny(tmp_path / "o.zarr", model=_OomAbove(tiny_model(), 8), batch_size=64)
    assert stats.batch_size_used == 8 and stats.rows_computed == N_ROWS
    assert "out of memory" in capsys.readouterr().err
    build_tiny(tmp_path / "ref.zarr", batch_size=8)
    assert np.array_equal(raw(tmp_path / "o.zarr"), raw(tmp_path / "ref.zarr"))
    with pytest.raises(CacheError, match="batch size 1"):
        build_tiny(tmp_path / "never.zarr", model=_OomAbove(tiny_model(), 0), batch_size=4)


def test_writer_thread_failure_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FullDisk:
        def __setitem__(self, key: object, value: object) -> None:
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


def test_bad_arguments_fail_loudly(tmp_path: Path) -> None:
    ds = tiny_dataset(64)
    with pytest.raises(BadInput, match="batch_size"):
        build_tiny(tmp_path / "a.zarr", ds, batch_size=0)
    with pytest.raises(BadInput, match="normalisation"):
        build_tiny(tmp_path / "b.zarr", ds.with_normalisation(None), attrs=tiny_attrs(ds))
    build_tiny(tmp_path / "c.zarr", ds)
    with pytest.raises(BadInput, match="chunk_rows"):
        build_tiny(tmp_path / "c.zarr", ds, chunk_rows=16)
    assert os.path.isdir(tmp_path / "c.zarr")
