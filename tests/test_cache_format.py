"""The store schema: what create_store writes (read back with plain zarr), geometry, opening and completion."""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from kdtrack import __version__
from kdtrack.cache.format import (MAX_CHUNK_BYTES, cache_key, chunk_bounds, chunk_rows_for, create_store,
                                  default_chunk_rows, done_flags, is_store, mark_complete, mark_incomplete, num_chunks,
                                  open_store, remove_store, store_nbytes)
from kdtrack.cache.ids import decode_ids, encode_ids, id_width
from kdtrack.errors import BadInput, CacheError

ATTRS = {"teacher_run_id": "teach01", "checkpoint_sha256": "c" * 64, "dataset_digest": "d" * 64, "cache_key": "k",
         "splits": ["train"], "normalisation": None, "model_spec": {"name": "mlp"}}


def new_store(path: Path, n: int = 5, chunk_rows: int = 2) -> zarr.Group:
    """A created store of `n` rows, 3 classes, float32, ids `s/<i>`, labels i % 3."""
    return create_store(path, sample_ids=[f"s/{i}" for i in range(n)], labels=np.arange(n) % 3, output_shape=(3,),
                        dtype="float32", chunk_rows=chunk_rows, attrs=ATTRS)


def test_creating_over_an_existing_path_is_refused(tmp_path):
    """create_store never overwrites: an existing path is a CacheError naming it."""
    path = tmp_path / "logits.zarr"
    new_store(path)
    with pytest.raises(CacheError) as err:
        new_store(path)
    assert err.value.what == f"cannot create a cache at {path}: the path exists"
    assert "kdtrack.cache.remove_store" in err.value.fix


def test_a_corrupt_flag_object_counts_as_not_done(tmp_path):
    """A flag object failing its checksum reads as not done; the other flags keep their value."""
    path = tmp_path / "logits.zarr"
    new_store(path)  # 5 rows in chunks of 2: three flags
    zarr.open_array(path / "chunk_done", mode="r+")[:] = True
    flag_file = path / "chunk_done" / "c" / "1"
    raw = bytearray(flag_file.read_bytes())
    raw[0] ^= 0x01  # the CRC32C no longer matches
    flag_file.write_bytes(bytes(raw))
    assert done_flags(zarr.open_group(path, mode="r")).tolist() == [True, False, True]


def array_meta(path: Path, name: str) -> dict:
    return json.loads((path / name / "zarr.json").read_text())


def test_created_store_holds_ids_labels_and_derived_attributes(tmp_path):
    """create_store writes ids, labels, derived attributes and checksummed arrays of the schema."""
    path = tmp_path / "deep" / "logits.zarr"  # missing parent folders are created
    group = create_store(path, sample_ids=("a", "b", "c"), labels=[2, -1, 0], output_shape=(4,), dtype="float16",
                         chunk_rows=2, attrs={**ATTRS, "num_rows": 99, "complete": True})
    assert group.read_only is False  # opened for the build to write into
    stored = zarr.open_group(path, mode="r")
    assert stored["sample_ids"][:].tolist() == ["a", "b", "c"]
    assert stored["sample_ids_utf8"][:].tolist() == [[97], [98], [99]]  # ord("a"), ord("b"), ord("c")
    assert stored["labels"][:].tolist() == [2, -1, 0] and stored["labels"].dtype == np.int64
    assert stored["chunk_done"][:].tolist() == [False, False] and np.isnan(stored["logits"][:]).all()
    attrs = dict(stored.attrs)
    assert {k: attrs[k] for k in ATTRS} == ATTRS
    assert {k: attrs[k] for k in ("format", "num_classes", "output_shape", "dtype", "chunk_rows", "num_rows",
                                  "complete", "initialised", "fidelity", "kdtrack_version")} == {
        "format": "kdtrack.logits/2", "num_classes": 4, "output_shape": [4], "dtype": "float16", "chunk_rows": 2,
        "num_rows": 3, "complete": False, "initialised": True, "fidelity": None, "kdtrack_version": __version__}
    created = datetime.datetime.fromisoformat(attrs["created_at"])
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 60
    crc = {"name": "crc32c"}
    expected = {  # name: (shape, chunk shape, fill value, data type, serializer, dimension names)
        "logits": ([3, 4], [2, 4], "NaN", "float16", "bytes", ["row", "class"]),
        "sample_ids": ([3], [2], "", "string", "vlen-utf8", ["row"]),
        "sample_ids_utf8": ([3, 1], [2, 1], 0, "uint8", "bytes", ["row", "byte"]),
        "labels": ([3], [2], -2, "int64", "bytes", ["row"]),
        "chunk_done": ([2], [1], False, "bool", "bytes", ["chunk"]),
    }
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == sorted(expected)
    for name, (shape, chunks, fill, dtype, serializer, dims) in expected.items():
        meta = array_meta(path, name)
        assert (meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"], meta["fill_value"],
                meta["data_type"], meta["dimension_names"]) == (shape, chunks, fill, dtype, dims), name
        assert [c["name"] for c in meta["codecs"]] == [serializer, "crc32c"] and meta["codecs"][1] == crc, name
    assert [p.name for p in tmp_path.joinpath("deep").iterdir()] == ["logits.zarr"]  # no creation folder left


def test_signal_outputs_have_no_class_count(tmp_path):
    """A multi-dimensional output has num_classes None and chunks over whole rows."""
    create_store(tmp_path / "s.zarr", sample_ids=["a"], labels=[-1], output_shape=(30, 3), dtype="float32",
                 chunk_rows=1, attrs=ATTRS)
    attrs = zarr.open_group(tmp_path / "s.zarr", mode="r").attrs
    assert attrs["num_classes"] is None and attrs["output_shape"] == [30, 3]
    assert array_meta(tmp_path / "s.zarr", "logits")["chunk_grid"]["configuration"]["chunk_shape"] == [1, 30, 3]
    assert array_meta(tmp_path / "s.zarr", "logits")["dimension_names"] == ["row", "output_0", "output_1"]


def test_ids_are_also_stored_as_zero_padded_utf8_bytes(tmp_path):
    """`sample_ids_utf8` is (N, longest UTF-8 id) uint8, each id's bytes then zeros; an id holding NUL is refused."""
    ids = ["b/é", "a", "dir/x.npy"]  # "é" is two bytes: widths 4, 1, 9
    create_store(tmp_path / "s.zarr", sample_ids=ids, labels=[0, 1, 2], output_shape=(2,), dtype="float32",
                 chunk_rows=2, attrs=ATTRS)
    raw = zarr.open_group(tmp_path / "s.zarr", mode="r")["sample_ids_utf8"][:]
    assert raw.dtype == np.uint8 and raw.shape == (3, 9)
    assert raw.tolist() == [[98, 47, 0xC3, 0xA9, 0, 0, 0, 0, 0], [97, 0, 0, 0, 0, 0, 0, 0, 0],
                            [100, 105, 114, 47, 120, 46, 110, 112, 121]]
    with pytest.raises(BadInput) as err:
        create_store(tmp_path / "n.zarr", sample_ids=["a\0b"], labels=[0], output_shape=(2,), dtype="float32",
                     chunk_rows=1, attrs=ATTRS)
    assert err.value.what == "sample id 'a\\x00b' holds a NUL character" and not (tmp_path / "n.zarr").exists()


def test_ids_are_encoded_to_the_width_given_and_refused_when_they_do_not_fit_or_hold_nul():
    """encode_ids pads to `width` bytes and never cuts an id or stores a NUL; no ids give (0, width) and width 1."""
    assert encode_ids(["é", "ab"], 3).tolist() == [[0xC3, 0xA9, 0], [97, 98, 0]]
    assert encode_ids([], 3).shape == (0, 3) and id_width([]) == 1
    for ids, width in ((["abc"], 2), (["a\0"], 5)):  # three bytes in two; a NUL that would read as padding
        with pytest.raises(BadInput, match="does not fit ids of"):
            encode_ids(ids, width)


def test_utf8_id_rows_decode_to_ids_and_bytes_that_are_not_utf8_to_the_replacement_character():
    """decode_ids reads any integer array of byte values (a plain list too), drops the zero padding, and decodes
    bytes that are not UTF-8 as U+FFFD instead of failing (a store written by another tool may hold them)."""
    rows = [[98, 47, 0xC3, 0xA9, 0], [97, 0, 0, 0, 0], [0xFF, 120, 0, 0, 0]]  # "b/é", "a", a lone 0xFF then "x"
    assert decode_ids(rows) == ["b/é", "a", "\ufffdx"]
    assert decode_ids(np.array(rows, dtype=np.int64)) == ["b/é", "a", "\ufffdx"]


@pytest.mark.parametrize(("rows", "shape", "dtype", "requested", "expected"), [
    (1259, (10,), "float32", None, 1259),  # 4 MiB would be 104704 rows: capped at the 1259 there are
    (10**6, (10,), "float32", None, 104704),  # 4 MiB / 40 B = 104857, down to a multiple of 256
    (1000, (1024, 1024), "float32", None, 1),  # one 4 MiB row: one row a chunk, not 256 (1 GiB)
    (1000, (5000,), "float32", None, 209),  # 20000 B rows: 4 MiB holds 209, fewer than 256
    (70, (3,), "float32", 10**6, 70),  # an explicit request is capped at the row count too
    (1, (3,), "float32", 8, 1),  # down to one row
    (10**6, (1024,), "float32", 65536, 65536),  # 65536 x 4 KiB = 256 MiB: the largest chunk allowed
    (5, (2**28,), "float16", 1, 1),  # each row alone is 512 MiB: one row a chunk is still allowed
])
def test_chunk_rows_never_exceed_the_rows_and_a_chunk_is_bounded(rows, shape, dtype, requested, expected):
    """chunk_rows_for: default ~4 MiB (at most), never more rows than the store, explicit requests bounded."""
    assert chunk_rows_for(rows, shape, dtype, requested) == expected


def test_a_requested_chunk_above_the_bound_is_refused():
    """More than MAX_CHUNK_BYTES (256 MiB) of logits per chunk is refused with the largest chunk_rows allowed."""
    assert MAX_CHUNK_BYTES == 256 * 2**20
    with pytest.raises(BadInput) as err:
        chunk_rows_for(10**6, (1024,), "float32", 65537)  # 65537 x 4096 B, one row over 256 MiB
    assert err.value.what == ("chunk_rows=65537 gives chunks of 268,439,552 B of logits, more than 268,435,456 B "
                              "(256 MiB)")  # 65537 * 4096 and 2**28
    assert err.value.fix == "use chunk_rows <= 65536, or 0 for about 4 MiB per chunk"
    with pytest.raises(BadInput, match="chunk_rows=2 gives chunks of 268,435,464 B") as err:  # 2 rows of 2**27 + 4 B
        chunk_rows_for(10, (2**25 + 1,), "float32", 2)
    assert err.value.fix == "use chunk_rows <= 1, or 0 for about 4 MiB per chunk"


@pytest.mark.parametrize(("ids", "labels", "chunk_rows"), [
    (["a", "b"], [0], 1),  # one label short
    (["a"], [[0]], 1),  # labels not flat
    ([], [], 1),  # no rows
    (["a"], [0], 0),
])
def test_create_store_refuses_bad_geometry(tmp_path, ids, labels, chunk_rows):
    """Mismatched labels, no rows or chunk_rows < 1 are refused before anything is written."""
    with pytest.raises(BadInput) as err:
        create_store(tmp_path / "s.zarr", sample_ids=ids, labels=labels, output_shape=(2,), dtype="float32",
                     chunk_rows=chunk_rows, attrs=ATTRS)
    shape = np.asarray(labels).shape
    assert err.value.what == f"{len(ids)} sample ids, labels of shape {shape}, chunk_rows={chunk_rows}"
    assert err.value.fix == "give one label per sample id, at least one row, and chunk_rows >= 1"
    assert not (tmp_path / "s.zarr").exists()


def test_create_store_checks_the_caller_attributes(tmp_path):
    """Missing caller attributes, a contradicting num_classes or an unknown dtype are refused."""
    args = dict(sample_ids=["a"], labels=[0], output_shape=(2,), dtype="float32", chunk_rows=1)
    with pytest.raises(BadInput) as err:
        create_store(tmp_path / "a.zarr", **args, attrs={k: v for k, v in ATTRS.items() if k != "splits"})
    assert err.value.what == "cache attrs lack ['splits']" and "'model_spec'" in err.value.fix
    with pytest.raises(BadInput) as err:
        create_store(tmp_path / "b.zarr", **args, attrs={**ATTRS, "num_classes": 3})
    assert err.value.what == "attrs say num_classes=3 but the teacher's output gives 2"
    assert err.value.fix == "leave num_classes out of attrs: it is derived from the output shape"
    with pytest.raises(BadInput, match="cache dtype 'bfloat16' is not supported") as err:
        create_store(tmp_path / "c.zarr", **{**args, "dtype": "bfloat16"}, attrs=ATTRS)
    assert err.value.fix == "use one of: float16, float32"
    create_store(tmp_path / "d.zarr", **args, attrs={**ATTRS, "num_classes": 2})  # agreeing is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]


@pytest.mark.parametrize(("n", "chunk_rows", "bounds"), [
    (5, 2, [(0, 2), (2, 4), (4, 5)]),
    (4, 2, [(0, 2), (2, 4)]),
    (1, 3, [(0, 1)]),
])
def test_chunk_geometry(tmp_path, n, chunk_rows, bounds):
    """Chunk count and bounds for n rows, from numbers or from a store; out-of-range chunks refused."""
    group = new_store(tmp_path / "s.zarr", n=n, chunk_rows=chunk_rows)
    assert num_chunks(n, chunk_rows) == num_chunks(group) == len(bounds)
    assert [chunk_bounds(n, chunk_rows, c) for c in range(len(bounds))] == bounds
    assert [chunk_bounds(group, None, c) for c in range(len(bounds))] == bounds
    assert chunk_bounds(group, 1, n - 1) == (n - 1, n)  # an explicit chunk_rows wins over the store's
    for c in (-1, len(bounds)):
        with pytest.raises(BadInput) as err:
            chunk_bounds(n, chunk_rows, c)
        assert err.value.what == f"chunk {c} does not exist in a store of {n} rows cut into chunks of {chunk_rows}"
        assert err.value.fix == f"use chunk indices 0..{len(bounds) - 1}"


@pytest.mark.parametrize("chunk_rows", [None, 0])
def test_chunk_geometry_needs_positive_chunk_rows(chunk_rows):
    """chunk_rows must be given and positive."""
    with pytest.raises(BadInput) as err:
        num_chunks(10, chunk_rows)
    assert err.value.what == f"chunk_rows must be a positive int, got {chunk_rows!r}"
    assert err.value.fix == "e.g. default_chunk_rows(shape, dtype)"
    assert num_chunks(10, 1) == 10


def test_open_is_remove_refuse_what_is_not_a_cache(tmp_path):
    """Opening, testing and removing refuse folders that are not kdtrack caches, and never delete them."""
    path = tmp_path / "logits.zarr"
    assert not is_store(path)
    remove_store(path)  # nothing there: nothing to do
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CacheError) as err:
        remove_store(plain)
    assert err.value.what == f"{plain} exists but is not a Zarr v3 store"
    assert plain.is_dir()
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(CacheError, match=f"^{tmp_path / 'broken.zarr'} is not a readable Zarr group"):
        is_store(tmp_path / "broken.zarr")
    zarr.open_group(tmp_path / "foreign.zarr", mode="w", attributes={"format": "other/1"})
    with pytest.raises(CacheError) as err:
        open_store(tmp_path / "foreign.zarr")
    assert err.value.what == (f"{tmp_path / 'foreign.zarr'} is not a kdtrack cache of format kdtrack.logits/2 "
                              "(format attribute: 'other/1')")
    assert (tmp_path / "foreign.zarr").is_dir()
    new_store(path)
    assert is_store(path) and open_store(path).read_only and not open_store(path, "r+").read_only
    with pytest.raises(BadInput, match="unknown store mode 'w'"):
        open_store(path, "w")
    remove_store(path)
    assert not path.exists()


def test_open_store_refuses_a_half_created_store(tmp_path):
    """open_store refuses a store never marked initialised, or lacking an array."""
    path = tmp_path / "logits.zarr"
    new_store(path)
    zarr.open_group(path, mode="r+").update_attributes({"initialised": False})
    assert is_store(path)
    with pytest.raises(CacheError) as err:
        open_store(path)
    assert err.value.what == f"the cache at {path} was never fully created (initialised is false)"
    del zarr.open_group(path, mode="r+").attrs["initialised"]  # no flag at all: not known to be created
    with pytest.raises(CacheError, match="never fully created"):
        open_store(path)
    zarr.open_group(path, mode="r+").update_attributes({"initialised": True})
    shutil.rmtree(path / "labels")
    with pytest.raises(CacheError) as err:
        open_store(path)
    assert err.value.what == f"the cache at {path} lacks the arrays ['labels']"
    with pytest.raises(CacheError) as err:
        open_store(tmp_path / "absent.zarr")
    assert err.value.what == f"no logit cache at {tmp_path / 'absent.zarr'}"


def test_complete_only_when_every_chunk_is_done(tmp_path):
    """mark_complete is refused while chunks are pending; it records the fidelity; mark_incomplete undoes it."""
    group = new_store(tmp_path / "s.zarr", n=12, chunk_rows=1)
    group["chunk_done"][:] = [True] * 5 + [False] * 7
    with pytest.raises(CacheError) as err:
        mark_complete(group, {"max_abs_diff": 0.0})
    assert err.value.what == "cannot mark the cache complete: 7 chunk(s) not done, e.g. [5, 6, 7, 8, 9]"
    assert zarr.open_group(tmp_path / "s.zarr", mode="r").attrs["complete"] is False
    group["chunk_done"][:] = True
    mark_complete(group, {"max_abs_diff": 0.5})
    attrs = zarr.open_group(tmp_path / "s.zarr", mode="r").attrs
    assert attrs["complete"] is True and attrs["fidelity"] == {"max_abs_diff": 0.5}
    mark_complete(group, None)
    assert zarr.open_group(tmp_path / "s.zarr", mode="r").attrs["fidelity"] is None
    mark_incomplete(group)
    assert zarr.open_group(tmp_path / "s.zarr", mode="r").attrs["complete"] is False


def test_store_nbytes_sums_every_file(tmp_path):
    """store_nbytes sums the sizes of all files below a folder."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x").write_bytes(b"123")
    (tmp_path / "a" / "b" / "y").write_bytes(b"45678")
    assert store_nbytes(tmp_path / "a") == 8 and store_nbytes(tmp_path / "a" / "b") == 5


def test_a_killed_creation_is_cleaned_up_but_a_live_one_is_kept(tmp_path):
    """A creation folder no process holds is removed; a locked one and other stores' are kept."""
    path = tmp_path / "logits.zarr"
    for i in range(8):  # what killed creations left
        (tmp_path / f".logits.zarr.creating-dead{i}" / "sub").mkdir(parents=True)
    other = tmp_path / ".logits.zarrX.creating-dead"  # another store's creation folder
    other.mkdir()
    live = tmp_path / ".logits.zarr.creating-live"
    live.mkdir()
    for name in ("gone-a", "gone-z"):  # vanishes before it can be opened: skipped, the others still handled
        (tmp_path / f".logits.zarr.creating-{name}").symlink_to(tmp_path / "nowhere")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        new_store(path)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == [".logits.zarr.creating-gone-a", ".logits.zarr.creating-gone-z", ".logits.zarr.creating-live",
                        ".logits.zarrX.creating-dead", "logits.zarr"]
    finally:
        os.close(fd)


def test_a_stale_creation_another_cleaner_removes_first_does_not_fail_the_creation(tmp_path, monkeypatch):
    """Two creations clean up at once: one opens a stale folder, the other removes it and lets go of its lock, the
    first then takes the lock of a folder that is gone. Its creation goes on."""
    path = tmp_path / "logits.zarr"
    stale = tmp_path / ".logits.zarr.creating-dead"
    (stale / "sub").mkdir(parents=True)
    real_flock = fcntl.flock

    def other_cleaner_was_first(fd: int, operation: int) -> None:
        real_flock(fd, operation)
        if operation & fcntl.LOCK_NB and stale.exists():  # the cleanup's try-lock, not the creation's own lock
            shutil.rmtree(stale)

    monkeypatch.setattr(fcntl, "flock", other_cleaner_was_first)
    new_store(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.zarr"]


def test_cache_key_is_the_sha256_of_a_compact_sorted_json():
    """The cache key is sha256 of compact, key-sorted JSON (with the views of a views cache); NaN is refused."""
    key = cache_key(checkpoint_sha256="c1", dataset_digest="d1", splits=["val", "train"], dtype="float16",
                    output_shape=[10], normalisation={"std": 2, "mean": 1}, topk=5)
    canonical = ('{"checkpoint_sha256":"c1","dataset_digest":"d1","dtype":"float16","format":"kdtrack.logits/2",'
                 '"normalisation":{"mean":1.0,"std":2.0},"output_shape":[10],"splits":["train","val"],"topk":5}')
    assert key == hashlib.sha256(canonical.encode()).hexdigest()
    views = cache_key(checkpoint_sha256="c1", dataset_digest="d1", splits=["train"], dtype="float32",
                      output_shape=[2, 10], normalisation=None,
                      views={"count": 2, "seed": 5, "ops": ["noise(std=0.1)"]})
    canonical = ('{"checkpoint_sha256":"c1","dataset_digest":"d1","dtype":"float32","format":"kdtrack.logits/2",'
                 '"normalisation":null,"output_shape":[2,10],"splits":["train"],"topk":null,'
                 '"views":{"count":2,"ops":["noise(std=0.1)"],"seed":5}}')
    assert views == hashlib.sha256(canonical.encode()).hexdigest()
    with pytest.raises(ValueError):  # NaN has no canonical JSON form
        cache_key(checkpoint_sha256="c1", dataset_digest="d1", splits=["train"], dtype="float16",
                  output_shape=[10], normalisation={"mean": float("nan"), "std": 1.0})


def test_default_chunk_rows_is_an_int_even_for_empty_rows():
    """default_chunk_rows returns an int, and a zero-byte row does not divide by zero."""
    rows = default_chunk_rows([100], "float16")
    assert type(rows) is int and rows == 4 * 2**20 // 200 // 256 * 256
    assert default_chunk_rows([0], "float32") == 4 * 2**20  # a zero-byte row counts as one byte
