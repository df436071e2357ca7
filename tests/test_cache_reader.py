"""LogitTable and ChunkAwareSampler against stores written here with plain zarr (no kdtrack writer)."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdtrack.cache import reader
from kdtrack.cache.reader import ChunkAwareSampler, LogitTable
from kdtrack.data.dataset import IndexedDataset
from kdtrack.errors import CacheError

N, C, CHUNK = 1000, 7, 64  # 16 chunks, the last one partial (40 rows)
NUM_CHUNKS = math.ceil(N / CHUNK)
DIGEST = "ab12cd34ef56" + "0" * 52


def write_store(path: Path, logits: np.ndarray, chunk_rows: int = CHUNK, **attrs: object) -> Path:
    """A `kdtrack.logits/1` store holding `logits`, ids `s/<i>`, labels i % 5, every chunk done."""
    n = len(logits)
    group = zarr.open_group(path, mode="w")
    arr = group.create_array("logits", shape=logits.shape, chunks=(chunk_rows, *logits.shape[1:]),
                             dtype=logits.dtype, compressors=[zarr.codecs.Crc32cCodec()], fill_value=np.nan)
    arr[:] = logits
    group.create_array("sample_ids", shape=(n,), chunks=(n,), dtype=str)[:] = np.array([f"s/{i}" for i in range(n)])
    group.create_array("labels", shape=(n,), chunks=(n,), dtype="int64",
                       compressors=[zarr.codecs.Crc32cCodec()])[:] = np.arange(n) % 5
    num_chunks = math.ceil(n / chunk_rows)
    group.create_array("chunk_done", shape=(num_chunks,), chunks=(num_chunks,), dtype=bool)[:] = True
    group.attrs.update({
        "format": "kdtrack.logits/1", "dataset_digest": DIGEST, "cache_key": "k", "teacher_run_id": "teach01",
        "checkpoint_sha256": "f" * 64, "num_classes": logits.shape[1] if logits.ndim == 2 else None,
        "output_shape": list(logits.shape[1:]), "dtype": str(logits.dtype), "splits": ["train"],
        "chunk_rows": chunk_rows, "num_rows": n, "complete": True, "initialised": True, **attrs,
    })
    return path


def stored_logits(seed: int = 0, shape: tuple[int, ...] = (N, C), dtype: str = "float16") -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 6).astype(dtype)


def dataset_with_ids(ids: list[str]) -> IndexedDataset:
    n = len(ids)
    return IndexedDataset(features=np.zeros((n, 2), np.float32), labels=np.zeros(n, np.int64), sample_ids=ids,
                          splits=np.full(n, "train"), domains=np.full(n, "d"), num_classes=5, source="test")


def budget_for_chunks(k: int, row_nbytes: int = C * 2) -> int:
    return k * CHUNK * row_nbytes + 1


@pytest.fixture()
def store16(tmp_path: Path) -> tuple[Path, np.ndarray]:
    logits = stored_logits()
    return write_store(tmp_path / "logits.zarr", logits), logits


def test_in_memory_lookup_returns_stored_values_as_float32(store16):
    path, logits = store16
    table = LogitTable.open(path)
    assert table.in_memory and table.num_rows == N and table.output_shape == (C,) and table.num_classes == C
    assert table.dtype == np.float16 and table.nbytes == N * C * 2 and table.resident_nbytes == N * C * 2
    rows = torch.from_numpy(np.random.default_rng(1).integers(0, N, 256))
    expected = torch.from_numpy(logits[rows.numpy()].astype(np.float32))  # float16 -> float32 is exact
    for request in (rows, rows.numpy(), rows.tolist(), rows.to(torch.int32)):
        got = table[request]
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    np.testing.assert_array_equal(table.labels, np.arange(N) % 5)


def test_permuted_subset_dataset_gets_each_rows_own_logits(store16):
    path, logits = store16
    cache_rows = np.random.default_rng(2).permutation(N)[:300]
    ds = dataset_with_ids([f"s/{i}" for i in cache_rows])
    for budget in (2 * 1024**3, budget_for_chunks(3)):
        table = LogitTable.open(path, ds, memory_budget_bytes=budget)
        assert table.num_rows == 300 and table.in_memory == (budget > N * C * 2)
        rows = np.random.default_rng(3).integers(0, 300, 100)
        np.testing.assert_array_equal(table[rows].numpy(), logits[cache_rows[rows]].astype(np.float32))
        np.testing.assert_array_equal(table.labels, cache_rows % 5)
        np.testing.assert_array_equal(table.chunk_of(np.arange(300)), cache_rows // CHUNK)


def test_dataset_sample_missing_from_cache_is_named(store16):
    path, _ = store16
    ds = dataset_with_ids(["s/3", "ghost/7", "s/9", "ghost/8"])
    with pytest.raises(CacheError, match=r"2 of 4 dataset samples.*'ghost/7', 'ghost/8'") as err:
        LogitTable.open(path, ds)
    assert "kdtrack cache-logits --teacher-run-id teach01" in str(err.value)


def test_hash_collisions_never_misalign(store16, monkeypatch):
    path, logits = store16
    # "ghost/<i>" hashes like the cached "s/<i>": only the string comparison can tell them apart
    monkeypatch.setattr(reader, "hash", lambda s: hash(s.replace("ghost/", "s/")), raising=False)
    with pytest.raises(CacheError, match="1 of 2 dataset samples.*'ghost/3'"):
        LogitTable.open(path, dataset_with_ids(["s/4", "ghost/3"]))
    # every id hashing alike forces the exact dictionary path, which must give the same rows
    monkeypatch.setattr(reader, "hash", lambda s: 1, raising=False)
    table = LogitTable.open(path, dataset_with_ids(["s/900", "s/4"]))
    np.testing.assert_array_equal(table[[0, 1]].numpy(), logits[[900, 4]].astype(np.float32))
    zarr.open_array(path / "sample_ids", mode="r+")[7] = "s/4"
    with pytest.raises(CacheError, match="1 duplicate ids"):
        LogitTable.open(path, dataset_with_ids(["s/4"]))


def test_incomplete_store_is_refused_unless_allowed(tmp_path):
    logits = stored_logits()
    path = write_store(tmp_path / "logits.zarr", logits, complete=False)
    with pytest.raises(CacheError, match="incomplete") as err:
        LogitTable.open(path)
    assert "kdtrack cache-logits" in err.value.fix and "kdtrack verify-cache --run-id" in err.value.fix
    assert torch.equal(LogitTable.open(path, require_complete=False)[[5]], torch.from_numpy(logits[[5]]).float())


def test_complete_store_with_unfinished_chunk_is_refused(tmp_path):
    path = write_store(tmp_path / "logits.zarr", stored_logits())
    zarr.open_array(path / "chunk_done", mode="r+")[4] = False
    with pytest.raises(CacheError, match="unfinished chunks"):
        LogitTable.open(path)


def test_digest_mismatch_names_both_digests(store16):
    path, _ = store16
    other = "99887766554433" + "1" * 50
    with pytest.raises(CacheError) as err:
        LogitTable.open(path, expected_digest=other)
    assert DIGEST[:12] in err.value.what and other[:12] in err.value.what and other[:13] not in err.value.what
    assert LogitTable.open(path, expected_digest=DIGEST).num_rows == N


def test_foreign_group_and_missing_path_are_refused(tmp_path):
    group = zarr.open_group(tmp_path / "other.zarr", mode="w")
    group.create_array("logits", shape=(4, 2), dtype="float32")
    with pytest.raises(CacheError, match="not a kdtrack logit cache"):
        LogitTable.open(tmp_path / "other.zarr")
    with pytest.raises(CacheError, match="not a readable zarr group"):
        LogitTable.open(tmp_path / "absent.zarr")


def test_chunked_mode_matches_in_memory_and_keeps_lru_in_budget(store16):
    path, logits = store16
    budget = budget_for_chunks(3)
    memory, chunked = LogitTable.open(path), LogitTable.open(path, memory_budget_bytes=budget)
    assert not chunked.in_memory and chunked.max_resident_chunks == 3
    rng = np.random.default_rng(4)
    for _ in range(20):
        rows = torch.from_numpy(rng.integers(0, N, 64))
        assert torch.equal(chunked[rows], memory[rows])
        assert 0 < chunked.resident_nbytes < budget
    grid = np.array([[1, 999], [500, 2]])  # any index shape: the result keeps it, each cell its own row
    assert torch.equal(chunked[grid], torch.from_numpy(logits[grid].astype(np.float32)))
    clone = pickle.loads(pickle.dumps(chunked))  # what a DataLoader worker receives
    assert clone.resident_nbytes == 0 and torch.equal(clone[[7, 900]], memory[[7, 900]])


def test_budget_below_one_chunk_is_refused(store16):
    path, _ = store16
    with pytest.raises(CacheError, match="raise memory_budget_bytes to at least 896"):
        LogitTable.open(path, memory_budget_bytes=100)


def test_sampler_is_a_seeded_per_epoch_permutation(store16):
    path, _ = store16
    sampler = ChunkAwareSampler(LogitTable.open(path, memory_budget_bytes=budget_for_chunks(4)), seed=7)
    assert sampler.window_chunks == 4 and len(sampler) == N
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(N)) and sorted(orders[1]) == list(range(N))
    assert orders[0] != orders[1] and orders[0] == orders[2]
    assert list(ChunkAwareSampler(np.arange(N) // CHUNK, seed=8)) != orders[0]


def test_sampler_keeps_each_chunk_within_one_window(store16):
    path, _ = store16
    chunk_of_rows = np.arange(N) // CHUNK
    order = ChunkAwareSampler(chunk_of_rows, seed=1, window_chunks=2).permutation().numpy()
    positions = np.argsort(order)  # position of each row in the epoch
    spans = [np.ptp(positions[chunk_of_rows == k]) for k in range(NUM_CHUNKS)]
    assert max(spans) < 2 * CHUNK  # a uniform shuffle would spread each chunk over ~N positions
    windows_seen = np.unique(chunk_of_rows[order[:2 * CHUNK]])
    assert len(windows_seen) <= 3 and not np.array_equal(order[:CHUNK], np.arange(CHUNK))


def test_chunk_aware_epoch_reads_each_chunk_once(store16):
    path, logits = store16
    table = LogitTable.open(path, memory_budget_bytes=budget_for_chunks(2))
    sampler = ChunkAwareSampler(table, seed=3)
    assert sampler.window_chunks == 2
    for batch in sampler.permutation().split(50):
        np.testing.assert_array_equal(table[batch].numpy(), logits[batch.numpy()].astype(np.float32))
    assert table.chunk_loads == NUM_CHUNKS


def test_corrupted_chunk_is_named(store16):
    path, logits = store16
    chunk_file = path / "logits" / "c" / "5" / "0"
    raw = bytearray(chunk_file.read_bytes())
    raw[10] ^= 0x01
    chunk_file.write_bytes(bytes(raw))
    table = LogitTable.open(path, memory_budget_bytes=budget_for_chunks(2))
    assert torch.equal(table[[0, 1]], torch.from_numpy(logits[[0, 1]].astype(np.float32)))  # other chunks still read
    with pytest.raises(CacheError, match="chunk 5 of") as err:
        table[[3, 5 * CHUNK + 1]]
    assert "kdtrack verify-cache --run-id" in err.value.fix and "--repair" in err.value.fix
    with pytest.raises(CacheError, match="chunk 5 of"):
        LogitTable.open(path)  # in memory: caught while loading


def test_corrupted_labels_are_a_cache_error(store16):
    path, _ = store16
    label_file = path / "labels" / "c" / "0"
    raw = bytearray(label_file.read_bytes())
    raw[0] ^= 0x01
    label_file.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="labels is corrupt"):
        LogitTable.open(path)


def test_deleted_chunk_file_is_not_read_as_nan(store16):
    path, _ = store16
    (path / "logits" / "c" / "2" / "0").unlink()
    with pytest.raises(CacheError, match="chunk 2 of .*NaN"):
        LogitTable.open(path)


def test_signal_shaped_outputs(tmp_path):
    logits = stored_logits(5, shape=(200, 30, 3), dtype="float32")
    path = write_store(tmp_path / "signal.zarr", logits, chunk_rows=16)
    rows = np.random.default_rng(6).integers(0, 200, 40)
    for budget in (2 * 1024**3, 3 * 16 * 30 * 3 * 4):
        table = LogitTable.open(path, memory_budget_bytes=budget)
        assert table.output_shape == (30, 3) and table.num_classes is None
        got = table[torch.from_numpy(rows)]
        assert got.shape == (40, 30, 3) and torch.equal(got, torch.from_numpy(logits[rows]))
