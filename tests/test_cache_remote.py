"""Packed stores for remote artifact stores: `pack`, and cache-logits / verify-cache over a real `mlflow server`."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cache_build_child import CHUNK_ROWS, tiny_attrs, tiny_dataset, tiny_model
from click.testing import CliRunner
from conftest import DIGITS, TINY_TEACHER, Server, cli, set_args, subprocess_env
from mlflow.tracking import MlflowClient

from kdtrack import checkpoint, config, tracking
from kdtrack.cache import LogitTable, VerifyReport, build, mark_complete, open_store, pack, verify_store
from kdtrack.cache.writer import _salvage_shard, _write_rows
from kdtrack.cli import main
from kdtrack.data import Normalisation, build_dataset
from kdtrack.errors import CacheError
from kdtrack.fetch import fetch
from kdtrack.stages import cache_logits
from kdtrack.models import ModelSpec, build_model

CPU = torch.device("cpu")
ARRAYS = ("logits", "sample_ids", "sample_ids_utf8", "labels", "chunk_done")
pack_module = import_module("kdtrack.cache.pack")  # the name `kdtrack.cache.pack` is the function
N_CHUNKS = 20
N_ROWS = N_CHUNKS * CHUNK_ROWS - 7  # a short last chunk, so the last shard is a partial edge shard


def files_under(path: Path) -> int:
    return sum(len(files) for _folder, _dirs, files in os.walk(path))


def contents(path: Path) -> dict[str, bytes]:
    """Every array's values as raw bytes (NaN-safe, dtype-exact), read with plain zarr."""
    group = zarr.open_group(path, mode="r")
    out = {}
    for name in ARRAYS:
        values = group[name][:]
        out[name] = "\n".join(values.tolist()).encode() if name == "sample_ids" else values.tobytes()
    return out


def shard_index(shard: Path, chunks: int) -> np.ndarray:
    """(chunks, 2) uint64 (offset, nbytes) per inner chunk: zarr's sharding index sits at the end, before its CRC32C."""
    return np.frombuffer(shard.read_bytes()[-(16 * chunks + 4):-4], dtype="<u8").reshape(chunks, 2)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny store built in place: 20 chunks of 32 rows (the last one short), one object per chunk."""
    ds = tiny_dataset(N_ROWS)
    path = tmp_path_factory.mktemp("remote") / "unpacked.zarr"
    build(path, tiny_model(), ds, attrs=tiny_attrs(ds), device=CPU, batch_size=8, chunk_rows=CHUNK_ROWS,
          progress=False)
    mark_complete(open_store(path, "r+"), None)
    return path


def repair(path: Path, chunks: list[int]) -> None:
    build(path, tiny_model(), tiny_dataset(N_ROWS), attrs=dict(open_store(path).attrs), device=CPU, batch_size=8,
          chunk_rows=CHUNK_ROWS, chunks=chunks, force_chunks=True, progress=False)


def verify(path: Path) -> VerifyReport:
    ds = tiny_dataset(N_ROWS)
    return verify_store(open_store(path, "r+"), ds.sample_ids, tiny_model(), ds, device=CPU, fidelity_rows=64)


def test_pack_gives_few_files_and_identical_values(unpacked: Path, tmp_path: Path):
    packed = tmp_path / "packed.zarr"
    written = pack(unpacked, packed)
    # 5 arrays x (1 chunk per flag or per 32 rows) + 6 metadata files, against 5 shards + 6 metadata files
    assert files_under(unpacked) == 5 * N_CHUNKS + 6 == 106
    assert written == files_under(packed) == 11
    group = zarr.open_group(packed, mode="r")  # plain zarr, no kdtrack
    assert dict(group.attrs) == dict(zarr.open_group(unpacked, mode="r").attrs)
    assert group["logits"].chunks == (CHUNK_ROWS, 5) and group["logits"].shards == (N_CHUNKS * CHUNK_ROWS, 5)
    assert group["chunk_done"].chunks == (1,) and group["chunk_done"].shards == (N_CHUNKS,)
    codecs = str(group["logits"].metadata.to_dict()["codecs"])
    assert codecs.count("crc32c") == 2  # inner chunks and the shard index
    assert contents(packed) == contents(unpacked)
    table = LogitTable.open(packed)
    assert table.chunk_rows == CHUNK_ROWS and table.num_chunks == N_CHUNKS
    np.testing.assert_array_equal(table[np.arange(N_ROWS)].numpy(), zarr.open_group(unpacked)["logits"][:])
    assert verify(packed).passed
    with pytest.raises(CacheError, match="the path exists"):
        pack(unpacked, packed)


@pytest.mark.slow  # packs a store at several shard sizes (~1 s on 2 cores)
def test_shards_hold_whole_chunks_below_the_size_limit(unpacked: Path, tmp_path: Path):
    packed = tmp_path / "packed.zarr"
    # 640 B of logits per chunk and a 3000 B limit: 4 chunks (128 rows) per shard, 5 shards
    pack(unpacked, packed, shard_bytes=3000)
    group = zarr.open_group(packed, mode="r")
    assert group["logits"].shards == (128, 5)
    assert sorted(p.name for p in (packed / "logits").iterdir()) == ["c.0.0", "c.1.0", "c.2.0", "c.3.0", "c.4.0",
                                                                      "zarr.json"]
    assert group["labels"].shards == (320,)  # 256 B per chunk: 11 fit, so 2 even shards of 10 chunks
    assert contents(packed) == contents(unpacked)
    assert verify(packed).passed


# Bytes a chunk of 32 rows: logits 32 x 5 x 4, labels 32 x 8, flags 1 (one row a chunk); ids "tiny/0".."tiny/632"
# as vlen-utf8, a 4-byte length before each: (10 x 10 + 90 x 11 + 533 x 12) / 633 = 11.83 B a row, 378.4 B a chunk;
# as UTF-8 bytes padded to the longest id ("tiny/632"): 8 B a row, 256 B a chunk, as labels.
@pytest.mark.parametrize(("shard_bytes", "rows"), [
    (1, {"logits": 32, "labels": 32, "sample_ids": 32, "chunk_done": 1}),  # below every chunk: one chunk a shard
    (10, {"logits": 32, "labels": 32, "sample_ids": 32, "chunk_done": 10}),  # 10 flags a shard
    (1136, {"logits": 32, "labels": 128, "sample_ids": 96, "chunk_done": 20}),  # 4 labels, 3 ids chunks fit: 7 shards
    (3000, {"logits": 128, "labels": 320, "sample_ids": 224, "chunk_done": 20}),  # 7 ids chunks fit: 3 shards of 7
])
def test_shard_rows_of_every_array(unpacked: Path, tmp_path: Path, shard_bytes: int, rows: dict[str, int]):
    """Each array's shards hold as many whole chunks as fit in `shard_bytes` (at least one), spread evenly."""
    packed = tmp_path / "packed.zarr"
    pack(unpacked, packed, shard_bytes=shard_bytes)
    group = zarr.open_group(packed, mode="r")
    assert {name: group[name].shards[0] for name in ARRAYS} == {**rows, "sample_ids_utf8": rows["labels"]}
    assert contents(packed) == contents(unpacked)


@pytest.mark.parametrize("block", [None, 64, 1])
def test_row_size_of_ids_is_their_mean_encoded_size(unpacked: Path, monkeypatch: pytest.MonkeyPatch,
                                                     block: int | None):
    """An id row counts its UTF-8 bytes and vlen-utf8's 4-byte length, averaged over all ids whatever the read block;
    a fixed-size row counts its item bytes."""
    if block is not None:
        monkeypatch.setattr(pack_module, "_ID_BLOCK", block)  # ids are read in blocks of whole chunks
    group = zarr.open_group(unpacked, mode="r")
    assert pack_module._row_nbytes(group["sample_ids"], unpacked) == pytest.approx((10 * 10 + 90 * 11 + 533 * 12) / 633)
    assert [pack_module._row_nbytes(group[name], unpacked)
            for name in ("logits", "sample_ids_utf8", "labels", "chunk_done")] == [20, 8, 8, 1]


@pytest.mark.parametrize(("id_block", "id_reads"), [
    (None, [(0, 32 * (2**20 // 32))]),  # one read of up to ~a million rows, whole chunks
    (1, [(s, s + 32) for s in range(0, N_ROWS, 32)]),  # a block smaller than a chunk: one chunk a read
])
def test_each_shard_is_read_once(unpacked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 id_block: int | None, id_reads: list[tuple[int, int]]):
    """Rows are copied with one read (and one assignment) per shard; the ids are read once more before, in blocks of
    whole chunks, to measure their size."""
    if id_block is not None:
        monkeypatch.setattr(pack_module, "_ID_BLOCK", id_block)
    reads = []
    read = pack_module._read

    def counting(array, start: int, stop: int, src):
        reads.append((array.basename, start, stop))
        return read(array, start, stop, src)

    monkeypatch.setattr(pack_module, "_read", counting)
    pack(unpacked, tmp_path / "packed.zarr", shard_bytes=3000)
    assert sorted(reads) == sorted([
        *[("logits", s, s + 128) for s in range(0, N_ROWS, 128)], *[("labels", s, s + 320) for s in (0, 320)],
        *[("sample_ids", *r) for r in id_reads], *[("sample_ids", s, s + 224) for s in (0, 224, 448)],
        *[("sample_ids_utf8", s, s + 320) for s in (0, 320)],
        ("chunk_done", 0, 20)])


def test_a_one_chunk_store_packs_into_one_shard_of_that_chunk(tmp_path: Path):
    """A store of one chunk gives shards of exactly that chunk, not larger than the arrays."""
    ds = tiny_dataset(CHUNK_ROWS)
    build(tmp_path / "one.zarr", tiny_model(), ds, attrs=tiny_attrs(ds), device=CPU, batch_size=8,
          chunk_rows=CHUNK_ROWS, progress=False)
    pack(tmp_path / "one.zarr", tmp_path / "packed.zarr")
    group = zarr.open_group(tmp_path / "packed.zarr", mode="r")
    assert [group[name].shards for name in ARRAYS] == [(CHUNK_ROWS, 5), (CHUNK_ROWS,), (CHUNK_ROWS, 7), (CHUNK_ROWS,),
                                                       (1,)]  # ids of up to 7 bytes: "tiny/31"
    np.testing.assert_array_equal(group["logits"][:], zarr.open_group(tmp_path / "one.zarr", mode="r")["logits"][:])


def test_shards_of_fill_values_are_stored_too(tmp_path: Path):
    """Chunks never computed (NaN logits, false flags) still get their shard objects, so a re-upload replaces them."""
    ds = tiny_dataset(N_ROWS)
    build(tmp_path / "empty.zarr", tiny_model(), ds, attrs=tiny_attrs(ds), device=CPU, batch_size=8,
          chunk_rows=CHUNK_ROWS, chunks=[], progress=False)  # created, nothing computed
    pack(tmp_path / "empty.zarr", tmp_path / "packed.zarr", shard_bytes=1)
    assert files_under(tmp_path / "packed.zarr") == 5 * N_CHUNKS + 6
    group = zarr.open_group(tmp_path / "packed.zarr", mode="r")
    assert np.isnan(group["logits"][:]).all() and not group["chunk_done"][:].any()


def test_pack_keeps_array_attributes_dimension_names_and_filters(unpacked: Path, tmp_path: Path):
    """Array attributes, dimension names (what xarray reads) and filter codecs survive packing."""
    source = tmp_path / "named.zarr"
    shutil.copytree(unpacked, source)
    meta_path = source / "logits" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["dimension_names"], meta["attributes"] = ["row", "class"], {"units": "logit"}
    meta["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}})  # an array-to-array filter
    meta["codecs"][1]["configuration"] = {"endian": "big"}  # and a serializer other than zarr's default
    meta_path.write_text(json.dumps(meta))
    pack(source, tmp_path / "packed.zarr")
    logits = zarr.open_group(tmp_path / "packed.zarr", mode="r")["logits"]
    assert logits.metadata.dimension_names == ("row", "class") and logits.attrs.asdict() == {"units": "logit"}
    assert [type(f).__name__ for f in logits.filters] == ["TransposeCodec"] and logits.serializer.endian.value == "big"
    np.testing.assert_array_equal(logits[:], zarr.open_group(source, mode="r")["logits"][:])


@pytest.mark.slow  # packs, corrupts, verifies and repairs a store (over a second on 2 cores)
def test_one_corrupt_chunk_of_a_shard_is_repaired_alone(unpacked: Path, tmp_path: Path):
    packed = tmp_path / "packed.zarr"
    pack(unpacked, packed)
    shard = packed / "logits" / "c.0.0"
    good = shard.read_bytes()
    offset, nbytes = shard_index(shard, N_CHUNKS)[7]
    flip(shard, int(offset + nbytes // 2))
    report = verify(packed)
    assert not report.passed and report.repairable and report.chunks_to_rebuild() == [7]
    with pytest.raises(CacheError, match="chunk 7 of .* is corrupt"):
        LogitTable.open(packed)
    repair(packed, [7])
    # zarr rewrote the shard, keeping the other chunks' stored bytes: the object is byte-identical to before
    assert shard.read_bytes() == good
    assert verify(packed).passed and contents(packed) == contents(unpacked)


@pytest.mark.slow  # packs, corrupts, verifies and repairs a store (~2 s on 2 cores)
def test_a_corrupt_shard_index_is_repaired(unpacked: Path, tmp_path: Path):
    packed = tmp_path / "packed.zarr"
    pack(unpacked, packed, shard_bytes=3000)
    flip(packed / "logits" / "c.1.0", -10)  # inside the index of the shard of chunks 4..7
    report = verify(packed)
    assert report.chunks_to_rebuild() == [4, 5, 6, 7] and report.repairable
    repair(packed, [5])  # only one of them: the others now read as removed, still named for repair
    assert verify(packed).chunks_to_rebuild() == [4, 6, 7]
    repair(packed, [4, 6, 7])
    assert verify(packed).passed and contents(packed) == contents(unpacked)


@pytest.mark.slow  # packs, corrupts, verifies and repairs a store (over a second on 2 cores)
def test_a_corrupt_short_last_chunk_is_repaired_alone(unpacked: Path, tmp_path: Path):
    """Writing the short last chunk makes zarr decode it, so a corrupt one fails the write; its repair keeps the
    stored bytes of the other chunks in its shard."""
    packed = tmp_path / "packed.zarr"
    pack(unpacked, packed, shard_bytes=3000)  # logits shard c.4.0 holds chunks 16..19; 19 has 25 of 32 rows
    shard = packed / "logits" / "c.4.0"
    good = shard.read_bytes()
    offset, nbytes = shard_index(shard, 4)[3]
    flip(shard, int(offset + nbytes // 2))
    assert verify(packed).chunks_to_rebuild() == [19]
    repair(packed, [19])
    assert shard.read_bytes() == good
    assert verify(packed).passed and contents(packed) == contents(unpacked)


@pytest.mark.slow  # packs, corrupts, then two repairs and three verifications (~2 s on 2 cores)
def test_a_corrupt_labels_shard_index_is_repaired(unpacked: Path, tmp_path: Path):
    """A one-dimensional array's shard with a corrupt index is rebuilt like the logits' one."""
    packed = tmp_path / "packed.zarr"
    pack(unpacked, packed, shard_bytes=3000)  # labels: 2 shards of 10 chunks
    flip(packed / "labels" / "c.1", -10)  # inside the index of the shard of chunks 10..19
    assert verify(packed).chunks_to_rebuild() == list(range(10, 20))
    repair(packed, [12])  # only one of them: the others now read as removed, still named for repair
    assert verify(packed).chunks_to_rebuild() == [10, 11, *range(13, 20)]
    repair(packed, [10, 11, *range(13, 20)])
    assert verify(packed).passed and contents(packed) == contents(unpacked)


@pytest.mark.parametrize(("packed", "written"), [(True, "c.1.0"), (False, "c/4/0")])
def test_a_failed_write_to_readable_chunks_raises_its_own_error_and_leaves_them_alone(
        unpacked: Path, tmp_path: Path, packed: bool, written: str):
    """A write that fails while every chunk it touches decodes is not corruption: numpy's ValueError is raised as it
    is, and the object holding those rows (a shard, or in an unpacked store the chunk itself) is not touched."""
    store = tmp_path / "store.zarr"
    if packed:
        pack(unpacked, store, shard_bytes=3000)  # logits shard c.1.0 holds chunks 4..7
    else:
        shutil.copytree(unpacked, store)
    target = store / "logits" / written
    good = target.read_bytes()
    logits = zarr.open_group(store, mode="r+")["logits"]
    with pytest.raises(ValueError, match="could not broadcast"):
        _write_rows(logits, 4 * CHUNK_ROWS, np.zeros((CHUNK_ROWS, 4), dtype=np.float32))  # 4 columns, not 5
    assert target.read_bytes() == good


def test_a_shard_is_salvaged_only_when_a_chunk_of_it_does_not_decode(unpacked: Path, tmp_path: Path):
    """The rows of the shard holding a row, in the array's dtype, fill values where a chunk does not decode; nothing
    (None) when every chunk of that shard decodes."""
    packed = tmp_path / "packed.zarr"
    pack(unpacked, packed, shard_bytes=3000)  # logits: shards of 4 chunks of 32 rows
    logits = zarr.open_group(packed, mode="r+")["logits"]
    original = zarr.open_group(unpacked, mode="r")["logits"][:]
    assert _salvage_shard(logits, 5 * CHUNK_ROWS + 3) is None
    shard = packed / "logits" / "c.1.0"  # chunks 4..7
    offset, nbytes = shard_index(shard, 4)[2]  # chunk 6
    flip(shard, int(offset + nbytes // 2))
    first, rows = _salvage_shard(logits, 5 * CHUNK_ROWS + 3)
    assert first == 4 * CHUNK_ROWS and rows.shape == (4 * CHUNK_ROWS, original.shape[1])
    assert rows.dtype == logits.dtype == np.float32  # not the float64 of a bare np.full(..., 0.0)
    lost = slice(2 * CHUNK_ROWS, 3 * CHUNK_ROWS)
    assert np.isnan(rows[lost]).all()  # the fill value of logits: a lost row never passes for a real one
    kept = np.r_[0:2 * CHUNK_ROWS, 3 * CHUNK_ROWS:4 * CHUNK_ROWS]
    assert np.array_equal(rows[kept], original[4 * CHUNK_ROWS:8 * CHUNK_ROWS][kept])


@pytest.mark.slow  # packs a store once per case (~1 s each on 2 cores)
@pytest.mark.parametrize(("name", "rows"), [
    ("labels", r"96\.\.127"),  # copied shard by shard: the shard of chunk 3
    ("sample_ids", r"0\.\.632"),  # first read whole, to measure the ids' size
])
def test_pack_refuses_an_unreadable_store(unpacked: Path, tmp_path: Path, name: str, rows: str):
    """A chunk that fails its checksum stops the pack with the store and rows named; the partial copy never passes
    for a cache."""
    broken = tmp_path / "broken.zarr"
    pack(unpacked, broken, shard_bytes=1)  # one chunk per shard, like the unpacked layout
    flip(broken / name / "c.3", 5)
    with pytest.raises(CacheError, match=rf"^cannot pack {re.escape(str(broken))}: {name} rows {rows} are "
                                         r"unreadable .* verify-cache --repair"):
        pack(broken, tmp_path / "again.zarr", shard_bytes=1)
    # the half-written pack has every attribute but `initialised`, which stays false: it never passes for a cache
    attrs = dict(zarr.open_group(tmp_path / "again.zarr", mode="r").attrs)
    assert attrs == {**dict(zarr.open_group(broken, mode="r").attrs), "initialised": False}
    with pytest.raises(CacheError, match="never fully created"):
        open_store(tmp_path / "again.zarr")


def _kdtrack(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kdtrack", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _teacher_logits(client: MlflowClient, teacher: str, sample_ids: list[str], tmp: Path) -> np.ndarray:
    """The teacher's forward on the cached ids, from its checkpoint and the data alone (no kdtrack.cache)."""
    payload = checkpoint.load(client.download_artifacts(teacher, "checkpoints/best.pt", str(tmp)))
    model = build_model(ModelSpec.from_dict(payload["spec"]))
    model.load_state_dict(payload["state_dict"])
    data = build_dataset(config.load(DIGITS).data)
    row_of = {sid: r for r, sid in enumerate(data.sample_ids)}
    rows = data.take(np.array([row_of[sid] for sid in sample_ids]))
    x = rows.with_normalisation(Normalisation.from_dict(payload["normalisation"])).batch(np.arange(len(rows)))[0]
    with torch.inference_mode():
        return model.eval()(x).numpy()


@pytest.mark.slow  # kdtrack processes against the session's mlflow server
def test_cache_logits_and_verify_over_http(tracking_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    url = tracking_server.url
    cache_dir = str(tmp_path / "kdtrack-cache")  # downloads and remote build staging, not the home folder
    env = subprocess_env(MLFLOW_TRACKING_URI=url, KDTRACK_CACHE_DIR=cache_dir)
    sets = [a for pair in (*TINY_TEACHER, "experiment=cache-remote") for a in ("--set", pair)]
    teacher = _kdtrack(env, tmp_path, "train-teacher", "--config", str(DIGITS), *sets).stdout.split()[-1]
    cache_args = ("cache-logits", "--teacher-run-id", teacher, "--config", str(DIGITS),
                  "--set", "cache.chunk_rows=64", "--set", "experiment=cache-remote")
    run_id = _kdtrack(env, tmp_path, *cache_args).stdout.split()[-1]
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kdtrack.complete"] == "true"
    # The server's artifact root holds 5 shards + 6 metadata files, against 5 x 20 chunks + 6 unpacked.
    served = tracking_server.artifact_dir(run_id) / "logits.zarr"
    chunks = zarr.open_group(served, mode="r")["chunk_done"].shape[0]
    assert chunks >= 20 and files_under(served) == 11
    assert not list(Path(cache_dir).glob("builds/*"))  # staging removed after the upload

    local = Path(client.download_artifacts(run_id, "logits.zarr", str(tmp_path / "dl")))
    table = LogitTable.open(local)
    ids = zarr.open_group(local, mode="r")["sample_ids"][:].tolist()
    expected = _teacher_logits(client, teacher, ids, tmp_path / "teacher")
    np.testing.assert_allclose(table[np.arange(len(ids))].numpy(), expected, rtol=1e-5, atol=1e-5)
    proc = _kdtrack(env, tmp_path, "verify-cache", "--run-id", run_id, "--recompute", "8")
    assert proc.stdout.strip().endswith("cache verification PASSED")

    # In-process from here (the same CLI, a faster test): a chunk damaged on the server is repaired over
    # HTTP, and the re-uploaded shard replaces the old object.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("KDTRACK_CACHE_DIR", str(tmp_path / "fresh-downloads"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    shard = served / "logits" / "c.0.0"
    good = shard.read_bytes()
    offset, nbytes = shard_index(shard, chunks)[3]
    flip(shard, int(offset + nbytes // 2))
    result = CliRunner().invoke(main, ["verify-cache", "--run-id", run_id, "--repair", "--recompute", "8"])
    assert result.exit_code == 0 and "repaired chunks 3" in result.stdout, result.output
    assert shard.read_bytes() == good and files_under(served) == 11
    assert client.get_run(run_id).data.tags["kdtrack.complete"] == "true"

    result = CliRunner().invoke(main, list(cache_args))
    assert result.exit_code == 0 and result.stdout.split()[-1] == run_id
    assert f"reusing cache run {run_id}" in result.stderr


def _served_attrs(served: Path) -> dict:
    """The group attributes of a store on the server's disk, read as plain JSON (no zarr, no kdtrack)."""
    return json.loads((served / "zarr.json").read_text())["attributes"]


@pytest.mark.slow  # a teacher, a cache and three verifications against the session's mlflow server
def test_a_failed_remote_cache_says_so_on_the_server_and_is_not_fetched(tracking_server: Server, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """verify-cache updates the server's copy of the store (not only its download), and fetch refuses a cache that
    failed; once repaired, both say complete again and fetch gives a complete copy."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    monkeypatch.setenv("KDTRACK_CACHE_DIR", str(tmp_path / "kdtrack-cache"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    sets = set_args(*TINY_TEACHER, "experiment=cache-remote-failed")
    code, out, err = cli("train-teacher", "--config", str(DIGITS), *sets)
    assert code == 0, err
    code, out, err = cli("cache-logits", "--teacher-run-id", out.split()[-1], "--config", str(DIGITS), *sets,
                         "--set", "cache.chunk_rows=64")
    assert code == 0, err
    run_id, client = out.split()[-1], MlflowClient(tracking_uri=tracking_server.url)
    served = tracking_server.artifact_dir(run_id) / "logits.zarr"
    assert _served_attrs(served)["complete"] is True
    shard, chunks = served / "logits" / "c.0.0", zarr.open_group(served, mode="r")["chunk_done"].shape[0]
    offset, nbytes = shard_index(shard, chunks)[2]
    flip(shard, int(offset + nbytes // 2))  # chunk 2 of the one logits shard

    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "8")
    assert code == 1 and "FAIL integrity: chunk 2" in out, out + err
    assert client.get_run(run_id).data.tags["kdtrack.complete"] == "false"
    assert _served_attrs(served)["complete"] is False  # the server's store says what the run says
    code, out, err = cli("fetch", "--run-id", run_id, "--out", str(tmp_path / "fetched"))
    assert code == 1 and out == ""
    assert err.strip() == (f"error: cache run {run_id} is incomplete (FINISHED, kdtrack.complete=false, verification: "
                           "fail); nothing was downloaded — repair it with: kdtrack verify-cache --run-id "
                           f"{run_id} --repair, or build a new cache with kdtrack cache-logits")
    assert not (tmp_path / "fetched" / run_id / "logits.zarr").exists()

    code, out, err = cli("verify-cache", "--run-id", run_id, "--repair", "--recompute", "8")
    assert code == 0 and "repaired chunks 2" in out, out + err
    attrs = _served_attrs(served)
    assert attrs["complete"] is True and attrs["fidelity"]["passed"] is True and attrs["fidelity"]["rows_checked"] == 8
    code, out, err = cli("fetch", "--run-id", run_id, "--out", str(tmp_path / "fetched"))
    assert code == 0 and out.strip() == str(tmp_path / "fetched" / run_id / "logits.zarr"), err
    assert _served_attrs(Path(out.strip())) == attrs


def _logged_cache_run(unpacked: Path, tags: dict[str, str], attrs: dict | None = None) -> tuple[str, Path]:
    """A FINISHED cache run in the session store whose artifact `logits.zarr` is a copy of `unpacked` with `attrs`
    set; tagged with the store's key, teacher, checkpoint and digest, then `tags`. Returns (run id, the artifact)."""
    group = zarr.open_group(unpacked, mode="r")
    claimed = {f"kdtrack.{name}": str(group.attrs[name])
               for name in ("cache_key", "teacher_run_id", "checkpoint_sha256", "dataset_digest")}
    client = tracking.configure()
    experiment = client.get_experiment_by_name("cache-fetch") or client.create_experiment("cache-fetch")
    experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
    run_id = client.create_run(experiment_id, tags={"kdtrack.stage": "cache", **claimed, **tags}).info.run_id
    client.log_artifacts(run_id, str(unpacked), "logits.zarr")
    client.set_terminated(run_id, "FINISHED")
    artifact = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "logits.zarr"
    zarr.open_group(artifact, mode="r+").update_attributes(attrs or {})
    return run_id, artifact


def test_fetch_refuses_a_cache_that_failed_verification_and_downloads_nothing(store: str, unpacked: Path,
                                                                               tmp_path: Path):
    run_id, _ = _logged_cache_run(unpacked, {"kdtrack.complete": "false", "kdtrack.verified": "fail"})
    with pytest.raises(CacheError) as err:
        fetch(run_id, tmp_path)
    assert err.value.what == (f"cache run {run_id} is incomplete (FINISHED, kdtrack.complete=false, verification: "
                              "fail); nothing was downloaded")
    assert err.value.fix == (f"repair it with: kdtrack verify-cache --run-id {run_id} --repair, or build a new cache "
                             "with kdtrack cache-logits")
    assert not (tmp_path / run_id).exists()
    broken, _ = _logged_cache_run(unpacked, {"kdtrack.complete": "false", "kdtrack.problem": "its chunk 3 is gone"})
    with pytest.raises(CacheError, match=r"\(FINISHED, kdtrack.complete=false, its chunk 3 is gone\); nothing was"):
        fetch(broken, tmp_path)


@pytest.mark.slow  # packs, logs, fetches and verifies a store (over a second on 2 cores)
def test_a_fetched_copy_that_does_not_check_out_is_refused_and_marked_incomplete(store: str, unpacked: Path,
                                                                                  tmp_path: Path):
    """The run says complete but its store has an unfinished chunk: the fetched copy must not look complete."""
    run_id, artifact = _logged_cache_run(unpacked, {"kdtrack.complete": "true"})
    zarr.open_group(artifact, mode="r+")["chunk_done"][3] = False
    with pytest.raises(CacheError) as err:
        fetch(run_id, tmp_path)
    copy = tmp_path / run_id / "logits.zarr"
    assert err.value.what == (f"fetched cache of run {run_id} is not usable: the store of cache run {run_id} has 1 "
                              f"chunks not done (first: 3); the copy at {copy} is marked incomplete")
    assert json.loads((copy / "zarr.json").read_text())["attributes"]["complete"] is False
    assert json.loads((artifact / "zarr.json").read_text())["attributes"]["complete"] is True  # the run's own store
    good, _ = _logged_cache_run(unpacked, {"kdtrack.complete": "true"})
    assert fetch(good, tmp_path) == [tmp_path / good / "logits.zarr"]
    assert zarr.open_group(tmp_path / good / "logits.zarr", mode="r").attrs["complete"] is True


def test_a_cache_marked_broken_is_marked_so_on_a_remote_artifact_store_too(store: str, unpacked: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """With a remote artifact store (played here by the local one, seen as remote), the store is read from a
    download; marking it broken must also replace the stored `zarr.json`, not only the download's."""
    run_id, artifact = _logged_cache_run(unpacked, {"kdtrack.complete": "true"})
    monkeypatch.setattr(tracking, "local_artifact_dir", lambda run_id: None)
    cache_logits.mark_broken(tracking.configure().get_run(run_id), "a test problem")
    download = tracking.download_dir() / run_id / "logits.zarr"
    assert json.loads((download / "zarr.json").read_text())["attributes"]["complete"] is False
    assert json.loads((artifact / "zarr.json").read_text())["attributes"]["complete"] is False
    assert tracking.configure().get_run(run_id).data.tags["kdtrack.complete"] == "false"
