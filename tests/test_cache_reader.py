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
    """A `kdtrack.logits/2` store holding `logits`, ids `s/<i>`, labels i % 5, every chunk done."""
    n = len(logits)
    group = zarr.open_group(path, mode="w")
    arr = group.create_array("logits", shape=logits.shape, chunks=(chunk_rows, *logits.shape[1:]),
                             dtype=logits.dtype, compressors=[zarr.codecs.Crc32cCodec()], fill_value=np.nan)
    arr[:] = logits
    group.create_array("sample_ids", shape=(n,), chunks=(n,), dtype=str,
                       compressors=[zarr.codecs.Crc32cCodec()])[:] = np.array([f"s/{i}" for i in range(n)])
    group.create_array("labels", shape=(n,), chunks=(n,), dtype="int64",
                       compressors=[zarr.codecs.Crc32cCodec()])[:] = np.arange(n) % 5
    num_chunks = math.ceil(n / chunk_rows)
    group.create_array("chunk_done", shape=(num_chunks,), chunks=(num_chunks,), dtype=bool,
                       compressors=[zarr.codecs.Crc32cCodec()])[:] = True
    group.attrs.update({
        "format": "kdtrack.logits/2", "dataset_digest": DIGEST, "cache_key": "k", "teacher_run_id": "teach01",
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


def flip_byte(path: Path, offset: int = 0) -> None:
    """Flip one bit of a stored object, so its CRC32C no longer matches."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


VERIFY_HINT = "run: kdtrack verify-cache --run-id <cache run id> --repair (the cache of teacher run teach01)"


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
    grid = np.array([[1, 999], [500, 2]])  # any index shape: the result keeps it, each cell its own row
    for request in (grid, torch.from_numpy(grid).to(torch.int32)):
        assert torch.equal(table[request], torch.from_numpy(logits[grid].astype(np.float32)))
    assert table.max_resident_chunks == NUM_CHUNKS and table.chunk_loads == NUM_CHUNKS  # read once, at open
    assert table.labels.dtype == np.int64
    np.testing.assert_array_equal(table.labels, np.arange(N) % 5)


def test_to_moves_an_in_memory_table_to_the_device(store16):
    """An in-memory table moved with .to() serves lookups on that device; a chunked one stays on the host."""
    path, logits = store16
    table = LogitTable.open(path).to(torch.device("meta"))  # a device with no data, available on every machine
    got = table[torch.tensor([3, 999], device="meta")]
    assert got.device.type == "meta" and got.dtype == torch.float32 and got.shape == (2, C)
    chunked = LogitTable.open(path, memory_budget_bytes=budget_for_chunks(2))
    assert chunked.to(torch.device("cpu")) is chunked  # chunks stay on the host
    assert torch.equal(chunked[[3, 999]], torch.from_numpy(logits[[3, 999]].astype(np.float32)))


@pytest.mark.parametrize(("budget", "in_memory", "resident"), [
    (N * C * 2, True, NUM_CHUNKS),  # exactly the logits: in memory
    (N * C * 2 - 1, False, 15),
    (CHUNK * C * 2, False, 1),  # exactly one chunk: the smallest usable budget
])
def test_memory_budget_boundaries(store16, budget, in_memory, resident):
    """A budget of exactly the logits keeps them in RAM; one byte less, or one chunk, reads by chunks."""
    path, logits = store16
    table = LogitTable.open(path, memory_budget_bytes=budget)
    assert table.in_memory == in_memory and table.max_resident_chunks == resident
    rows = [0, 999, 64, 1]
    assert torch.equal(table[rows], torch.from_numpy(logits[rows].astype(np.float32)))


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
        assert table.chunk_of([]).tolist() == []  # an empty batch touches no chunk


def test_dataset_sample_missing_from_cache_is_named(store16):
    path, _ = store16
    ds = dataset_with_ids(["s/3", "ghost/7", "s/9", "ghost/8"])
    with pytest.raises(CacheError) as err:
        LogitTable.open(path, ds)
    assert err.value.what == f"2 of 4 dataset samples are not in the cache {path}, e.g. 'ghost/7', 'ghost/8'"
    assert "kdtrack cache-logits --teacher-run-id teach01" in err.value.fix


def test_dataset_of_the_first_cache_rows_reads_only_their_chunk(store16):
    """Aligning to a subset reads only the chunks its rows live in."""
    path, logits = store16
    table = LogitTable.open(path, dataset_with_ids([f"s/{i}" for i in range(C)]))  # as many rows as classes
    assert table.chunk_loads == 1 and torch.equal(table[np.arange(C)], torch.from_numpy(logits[:C]).float())
    table = LogitTable.open(path, dataset_with_ids(["s/130", "s/5", "s/140"]))  # chunks 2 and 0 only
    assert table.chunk_loads == 2 and torch.equal(table[[0, 1, 2]], torch.from_numpy(logits[[130, 5, 140]]).float())


def numbered_hash(offset: int):
    """A hash that orders ids by their number, `offset` + i for `<anything>/<i>`: placement is predictable."""
    return lambda s: offset + int(s.rsplit("/", 1)[1])


@pytest.mark.parametrize("offset", [0, 2**60])  # 2**60 + i: neighbours that float64 cannot tell apart
def test_alignment_at_both_ends_of_the_sorted_ids(store16, monkeypatch, offset):
    """Ids hashing before, after or between the cached ones are missing; the extreme cached ones are found."""
    path, logits = store16
    monkeypatch.setattr(reader, "hash", numbered_hash(offset), raising=False)
    ids = [999, 0, 5, 998, 1]
    table = LogitTable.open(path, dataset_with_ids([f"s/{i}" for i in ids]))
    assert torch.equal(table[np.arange(5)], torch.from_numpy(logits[ids]).float())
    for ghost in ("ghost/5000", "ghost/-1", "ghost/500"):  # after the last, before the first, between
        with pytest.raises(CacheError, match=f"1 of 2 dataset samples.*'{ghost}'"):
            LogitTable.open(path, dataset_with_ids(["s/999", ghost]))


def test_alignment_with_one_and_with_no_cached_rows(tmp_path, monkeypatch):
    """A one-row or empty store aligns or names the missing samples instead of failing on indexing."""
    monkeypatch.setattr(reader, "hash", numbered_hash(0), raising=False)
    one = write_store(tmp_path / "one.zarr", stored_logits(shape=(1, C)))
    assert LogitTable.open(one, dataset_with_ids(["s/0"])).num_rows == 1
    with pytest.raises(CacheError, match="1 of 1 dataset samples.*'ghost/5'"):
        LogitTable.open(one, dataset_with_ids(["ghost/5"]))
    empty = write_store(tmp_path / "empty.zarr", stored_logits(shape=(0, C)))
    with pytest.raises(CacheError, match="2 of 2 dataset samples.*'s/0', 's/1'"):
        LogitTable.open(empty, dataset_with_ids(["s/0", "s/1"]))


def test_store_holding_an_id_twice_is_refused(store16):
    """A store that holds one sample id twice cannot be aligned."""
    path, _ = store16
    zarr.open_array(path / "sample_ids", mode="r+")[7] = "s/4"
    with pytest.raises(CacheError) as err:
        LogitTable.open(path, dataset_with_ids(["s/4"]))
    assert err.value.what == f"{path}/sample_ids holds 1 duplicate ids"


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
    with pytest.raises(CacheError, match="1 of 3 dataset samples.*'ghost/1'"):
        LogitTable.open(path, dataset_with_ids(["s/900", "ghost/1", "s/4"]))
    zarr.open_array(path / "sample_ids", mode="r+")[7] = "s/4"
    with pytest.raises(CacheError) as err:
        LogitTable.open(path, dataset_with_ids(["s/4"]))
    assert err.value.what == f"{path}/sample_ids holds 1 duplicate ids"


def test_incomplete_store_is_refused_unless_allowed(tmp_path):
    logits = stored_logits()
    path = write_store(tmp_path / "logits.zarr", logits, complete=False)
    with pytest.raises(CacheError) as err:
        LogitTable.open(path)
    assert err.value.what == f"the cache {path} is incomplete (not every chunk is written and verified)"
    assert "kdtrack cache-logits --teacher-run-id teach01" in err.value.fix
    assert "kdtrack verify-cache --run-id" in err.value.fix
    assert torch.equal(LogitTable.open(path, require_complete=False)[[5]], torch.from_numpy(logits[[5]]).float())


def test_unfinished_chunk_of_an_incomplete_store_reads_as_nan(tmp_path):
    """With require_complete=False an unwritten chunk reads as NaN, not as an error."""
    logits = stored_logits()
    path = write_store(tmp_path / "logits.zarr", logits, complete=False)
    zarr.open_array(path / "chunk_done", mode="r+")[2] = False
    (path / "logits" / "c" / "2" / "0").unlink()  # never written
    for budget in (2 * 1024**3, budget_for_chunks(2)):
        got = LogitTable.open(path, require_complete=False, memory_budget_bytes=budget)[[2 * CHUNK, 5]]
        assert torch.isnan(got[0]).all() and torch.equal(got[1], torch.from_numpy(logits[5]).float())


def test_complete_store_with_unfinished_chunk_is_refused(tmp_path):
    path = write_store(tmp_path / "logits.zarr", stored_logits())
    zarr.open_array(path / "chunk_done", mode="r+")[4] = False
    with pytest.raises(CacheError) as err:
        LogitTable.open(path)
    assert err.value.what == (f"the cache {path} is inconsistent: "
                              "it is marked complete but chunk_done has unfinished chunks")
    assert err.value.fix == VERIFY_HINT


def replace_array(path: Path, name: str, shape: tuple[int, ...], dtype: str = "float32") -> None:
    chunks = (CHUNK, *shape[1:]) if shape else ()
    zarr.open_group(path, mode="r+").create_array(name, shape=shape, chunks=chunks, dtype=dtype, overwrite=True)


@pytest.mark.parametrize(("damage", "problems"), [
    (lambda p: replace_array(p, "logits", (N, C), "int32"),
     "logits are int32 (1000, 7), need float16/float32 (N, *output_shape)"),
    (lambda p: replace_array(p, "logits", (N,)),
     "logits are float32 (1000,), need float16/float32 (N, *output_shape); "
     "attribute output_shape=[7] but the arrays say []"),
    (lambda p: replace_array(p, "logits", ()),
     "logits are float32 (), need float16/float32 (N, *output_shape); sample_ids has shape (1000,), need (0,); "
     "labels has shape (1000,), need (0,); attribute num_rows=1000 but the arrays say 0; "
     "attribute chunk_rows=64 but the arrays say 0; attribute output_shape=[7] but the arrays say []"),
    (lambda p: replace_array(p, "sample_ids", (N - 1,), "str"), "sample_ids has shape (999,), need (1000,)"),
    (lambda p: replace_array(p, "labels", (N + 1,), "int64"), "labels has shape (1001,), need (1000,)"),
    (lambda p: replace_array(p, "chunk_done", (NUM_CHUNKS - 1,), "bool"),
     "chunk_done has shape (15,) for 1000 rows in chunks of 64"),
    (lambda p: zarr.open_group(p, mode="r+").attrs.update({"num_rows": 999}),
     "attribute num_rows=999 but the arrays say 1000"),
    (lambda p: zarr.open_group(p, mode="r+").attrs.update({"chunk_rows": 32}),
     "attribute chunk_rows=32 but the arrays say 64"),
    (lambda p: zarr.open_group(p, mode="r+").attrs.update({"output_shape": [8]}),
     "attribute output_shape=[8] but the arrays say [7]"),
])
def test_inconsistent_layout_is_refused_with_every_problem(store16, damage, problems):
    """Arrays that disagree with each other or with the attributes are refused, every problem named."""
    path, _ = store16
    damage(path)
    for require_complete in (True, False):
        with pytest.raises(CacheError) as err:
            LogitTable.open(path, require_complete=require_complete)
        assert err.value.what == f"the cache {path} is inconsistent: {problems}"
        assert err.value.fix == VERIFY_HINT


def test_store_without_an_array_or_the_optional_attributes(store16):
    """Optional attributes may be absent; a missing digest or array is refused by name."""
    path, logits = store16
    group = zarr.open_group(path, mode="r+")
    for key in ("num_rows", "chunk_rows", "output_shape"):  # checked against the arrays only when present
        del group.attrs[key]
    assert torch.equal(LogitTable.open(path)[[3]], torch.from_numpy(logits[[3]]).float())
    del group.attrs["dataset_digest"]
    with pytest.raises(CacheError) as err:
        LogitTable.open(path, expected_digest=DIGEST)
    assert err.value.what == f"the cache {path} is for dataset , not for this dataset {DIGEST[:12]}"
    del group["labels"]
    with pytest.raises(CacheError) as err:
        LogitTable.open(path)
    assert err.value.what == f"the cache {path} has no array 'labels'"
    assert err.value.fix == "rebuild it with kdtrack cache-logits"


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


def test_a_store_of_the_previous_format_is_refused_naming_both_formats(tmp_path):
    """A `kdtrack.logits/1` store (ids as strings only, no dimension names) is refused in one line naming both."""
    path = write_store(tmp_path / "old.zarr", stored_logits(), format="kdtrack.logits/1")
    with pytest.raises(CacheError) as err:
        LogitTable.open(path)
    assert err.value.what == (f"{path} is not a kdtrack logit cache (format 'kdtrack.logits/1', "
                              "expected 'kdtrack.logits/2')")
    assert "\n" not in err.value.what and "rebuild it with this version" in err.value.fix


def test_chunked_mode_matches_in_memory_and_keeps_lru_in_budget(store16):
    path, logits = store16
    budget = budget_for_chunks(3)
    memory, chunked = LogitTable.open(path), LogitTable.open(path, memory_budget_bytes=budget)
    assert not chunked.in_memory and chunked.max_resident_chunks == 3
    rng = np.random.default_rng(4)
    for _ in range(20):
        rows = torch.from_numpy(rng.integers(0, N, 64))
        got = chunked[rows]
        assert got.dtype == torch.float32 and torch.equal(got, memory[rows])
        assert 0 < chunked.resident_nbytes < budget
    grid = np.array([[1, 999], [500, 2]])  # any index shape: the result keeps it, each cell its own row
    assert torch.equal(chunked[grid], torch.from_numpy(logits[grid].astype(np.float32)))
    state = pickle.dumps(chunked)  # what a DataLoader worker receives: the index, not the resident chunks
    assert len(state) < len(pickle.dumps(LogitTable.open(path, memory_budget_bytes=budget))) + CHUNK * C * 2
    clone = pickle.loads(state)
    assert clone.resident_nbytes == 0 and torch.equal(clone[[7, 900]], memory[[7, 900]])
    assert clone.chunk_loads == chunked.chunk_loads + 2  # both chunks read again: none came with the clone


def test_chunked_lookups_evict_the_least_recently_used_chunk_the_batch_does_not_need(store16):
    """Batches within the budget: a missing chunk replaces the least recently used chunk that the batch itself
    does not need; values stay the stored ones. Chunk c holds rows 64c..64c+63."""
    path, logits = store16
    table = LogitTable.open(path, memory_budget_bytes=budget_for_chunks(2))

    def lookup(rows: list[int], loads: int) -> None:
        assert torch.equal(table[torch.tensor(rows)], torch.from_numpy(logits[rows].astype(np.float32)))
        assert table.chunk_loads == loads

    lookup([3], 1)  # chunk 0
    lookup([70], 2)  # chunk 1; chunk 0 is now the least recently used
    lookup([5, 130], 3)  # chunks 0 and 2: 0 stays (this batch needs it), 1 makes room for 2
    lookup([140], 3)  # chunk 2 is resident
    lookup([64], 4)  # chunk 1 again, in place of chunk 0 (last used before chunk 2)
    lookup([150], 4)  # so chunk 2 is still resident
    lookup([0], 5)  # chunk 0, in place of chunk 1
    lookup([64], 6)  # chunk 1, in place of chunk 2 (used before chunk 0 this time)
    lookup([1], 6)  # so chunk 0 is still resident
    lookup([999, 1], 7)  # the last chunk (15, 40 rows) in place of chunk 1, beside chunk 0
    assert table[torch.tensor([], dtype=torch.int64)].shape == table[[]].shape == (0, C)
    assert table._slab.dtype == torch.float16  # resident chunks stay in the stored dtype: the budget counts that


def test_a_chunk_that_fails_to_read_leaves_its_slot_free(store16):
    path, logits = store16
    flip_byte(path / "logits" / "c" / "2" / "0")
    table = LogitTable.open(path, memory_budget_bytes=budget_for_chunks(2))
    table[[0]], table[[64]]
    with pytest.raises(CacheError, match="chunk 2 of .* is corrupt"):
        table[[130]]
    assert table.resident_nbytes == CHUNK * C * 2  # chunk 1; chunk 0 made room for chunk 2, which never came
    assert torch.equal(table[[1, 65]], torch.from_numpy(logits[[1, 65]].astype(np.float32)))
    assert table.chunk_loads == 3  # chunks 0, 1, 0 again (a failed read is not counted)


def test_chunked_lookups_fill_free_slots_without_forgetting_the_last_chunk(store16):
    path, logits = store16
    table = LogitTable.open(path, memory_budget_bytes=budget_for_chunks(3))
    for rows, loads in (([999], 1), ([0], 2), ([998, 1], 2), ([64], 3), ([997], 3)):
        assert torch.equal(table[rows], torch.from_numpy(logits[rows].astype(np.float32)))
        assert table.chunk_loads == loads


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


def reference_order(chunk_of_rows: np.ndarray, window_chunks: int, entropy: list[int]) -> np.ndarray:
    """The documented epoch order for chunks 0..K-1: a seeded chunk ranking cut into windows, rows shuffled inside."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy))
    chunk_rank = rng.permutation(chunk_of_rows.max() + 1)
    return np.argsort(chunk_rank[chunk_of_rows] // window_chunks + rng.random(len(chunk_of_rows)))


@pytest.mark.parametrize(("seed", "epoch", "entropy"), [
    (5, None, [5, 0]),  # before any set_epoch the sampler yields epoch 0
    (5, 3, [5, 3]),
    (-1, -2, [2**64 - 1, 2**64 - 2]),  # any Python int works: seed and epoch are taken modulo 2**64
])
def test_sampler_order_depends_only_on_seed_and_epoch(seed, epoch, entropy):
    """The epoch order is fixed by (seed mod 2**64, epoch mod 2**64); epoch 0 before any set_epoch."""
    chunk_of_rows = np.arange(N) // CHUNK
    sampler = ChunkAwareSampler(chunk_of_rows, seed=seed, window_chunks=3)
    if epoch is not None:
        sampler.set_epoch(epoch)
    np.testing.assert_array_equal(sampler.permutation().numpy(), reference_order(chunk_of_rows, 3, entropy))


def test_sampler_window_sizes(tmp_path):
    """A one-chunk window visits chunks one at a time; zero is refused; in memory the window is 4."""
    chunk_of_rows = np.arange(N) // CHUNK
    order = ChunkAwareSampler(chunk_of_rows, seed=2, window_chunks=1).permutation().numpy()
    visited = chunk_of_rows[order]
    assert np.count_nonzero(visited[1:] != visited[:-1]) == NUM_CHUNKS - 1  # one window per chunk: each read once
    with pytest.raises(ValueError, match="window_chunks is 0; use a positive number of chunks"):
        ChunkAwareSampler(chunk_of_rows, seed=2, window_chunks=0)
    # an in-memory table reads no chunks, so its window stays the default even with fewer chunks than that
    path = write_store(tmp_path / "two_chunks.zarr", stored_logits(shape=(100, C)))
    assert ChunkAwareSampler(LogitTable.open(path), seed=2).window_chunks == 4


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
    with pytest.raises(CacheError, match=f"^chunk 5 of {path}/logits is corrupt") as err:
        table[[3, 5 * CHUNK + 1]]
    assert err.value.fix == VERIFY_HINT
    with pytest.raises(CacheError, match=f"^chunk 5 of {path}/logits is corrupt"):
        LogitTable.open(path)  # in memory: caught while loading


@pytest.mark.parametrize(("name", "require_complete"), [
    ("labels", True), ("chunk_done", True), ("chunk_done", False), ("sample_ids", True)])
def test_corrupted_ids_labels_or_flags_are_a_cache_error(store16, name, require_complete):
    """A checksum failure in ids, labels or done flags is a CacheError naming the array."""
    path, _ = store16
    flip_byte(path / name / "c" / "0")
    with pytest.raises(CacheError, match=f"^{path}/{name} is corrupt") as err:
        LogitTable.open(path, dataset_with_ids(["s/1"]), require_complete=require_complete)
    assert err.value.fix == VERIFY_HINT


def test_deleted_chunk_file_is_not_read_as_nan(store16):
    path, _ = store16
    (path / "logits" / "c" / "2" / "0").unlink()
    with pytest.raises(CacheError, match=f"^chunk 2 of {path}/logits is marked done but holds NaN") as err:
        LogitTable.open(path)
    assert err.value.fix == VERIFY_HINT


def test_signal_shaped_outputs(tmp_path):
    logits = stored_logits(5, shape=(200, 30, 3), dtype="float32")
    path = write_store(tmp_path / "signal.zarr", logits, chunk_rows=16)
    rows = np.random.default_rng(6).integers(0, 200, 40)
    for budget in (2 * 1024**3, 3 * 16 * 30 * 3 * 4):
        table = LogitTable.open(path, memory_budget_bytes=budget)
        assert table.output_shape == (30, 3) and table.num_classes is None
        got = table[torch.from_numpy(rows)]
        assert got.shape == (40, 30, 3) and torch.equal(got, torch.from_numpy(logits[rows]))


def test_the_float16_nan_check_agrees_with_numpy_on_every_bit_pattern():
    """The chunk check reads float16 bits (np.isnan is slow on float16): it must say what np.isnan says, for each
    of the 65,536 patterns alone (NaNs of either sign and any payload; infinities are not NaN)."""
    values = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    said = [reader._has_nan(v) for v in values]
    assert said == np.isnan(values[:, 0]).tolist() and sum(said) == 2 * (2**10 - 1)
    assert reader._has_nan(values[:5].astype(np.float32)) is False and reader._has_nan(np.float32([1, np.nan]))
    # a float32 whose upper half would be a float16 NaN (0x7E00) is a finite number, 2**125
    assert reader._has_nan(np.array([0x7E000000], np.uint32).view(np.float32)) is False
