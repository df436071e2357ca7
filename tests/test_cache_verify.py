"""Cache verification: integrity (checksums, NaN, done flags), coverage, fidelity, repair, completion, opening."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cache_build_child import BATCH, CHUNK_ROWS, tiny_attrs, tiny_dataset, tiny_model

from kdtrack.cache import (build, check_coverage, check_fidelity, check_integrity, fidelity_tolerance, mark_complete,
                           mark_incomplete, open_store, verify_store)
from kdtrack.errors import CacheError

CPU = torch.device("cpu")
N = 256  # 8 chunks of 32 rows


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A freshly built, never modified store of tiny_dataset(N) under tiny_model()."""
    path = tmp_path / "c.zarr"
    _build(path)
    return path


def _build(path: Path, **kw) -> None:
    ds = tiny_dataset(N)
    kw.setdefault("attrs", tiny_attrs(ds, dtype=kw.get("dtype", "float32")))
    build(path, tiny_model(), ds, device=CPU, batch_size=BATCH, chunk_rows=CHUNK_ROWS, progress=False, **kw)


def _verify(path: Path, model: torch.nn.Module | None = None, rows: int = N, **kw):
    ds = tiny_dataset(N)
    model = tiny_model() if model is None else model
    return verify_store(open_store(path), ds.sample_ids, model, ds, device=CPU, fidelity_rows=rows, **kw)


def _chunk_files(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every chunk object of the store: bytes and mtime in ns."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("c/**/*")) if p.is_file()}


def test_good_store_passes_and_is_marked_complete(good: Path) -> None:
    report = _verify(good)
    assert report.passed, report.lines()
    assert report.fidelity.rows_checked == N and report.fidelity.max_abs_diff <= 1e-6
    assert report.fidelity.top1_agreement == 1.0 and report.coverage.hit_rate == 1.0
    assert [line.split(" ")[0] for line in report.lines()] == ["PASS", "PASS", "PASS", "cache"]
    assert report.failures() == [] and not report.repairable and report.chunks_to_rebuild() == []
    metrics = report.metrics()
    assert metrics["integrity/bad_chunks"] == 0 and metrics["coverage/hit_rate"] == 1.0
    assert metrics["fidelity/top1_agreement"] == 1.0 and metrics["fidelity/rows_checked"] == N
    mark_complete(open_store(good, "r+"), report.fidelity_dict())
    attrs = zarr.open_group(good, mode="r").attrs
    assert attrs["complete"] is True and attrs["fidelity"]["rows_checked"] == N and attrs["fidelity"]["passed"]
    mark_incomplete(open_store(good, "r+"))
    assert zarr.open_group(good, mode="r").attrs["complete"] is False


def test_other_checkpoint_fails_provenance_and_is_not_repairable(good: Path) -> None:
    report = _verify(good, rows=0, expected_checkpoint="f" * 64)
    assert not report.passed and not report.repairable
    assert report.failures() == ["provenance: the cache was built from checkpoint ckpt0, not the expected ffffffffffff"]


def test_corrupt_chunk_is_named_and_repaired_alone(good: Path) -> None:
    victim = good / "logits" / "c" / "3" / "0"
    original = victim.read_bytes()
    data = bytearray(original)
    data[17] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = _verify(good)  # fidelity reads the same rows: it must fail them, not crash
    assert report.fidelity.bad_chunks == [3] and not report.fidelity.passed
    assert not report.passed and report.repairable and report.chunks_to_rebuild() == [3]
    assert list(report.integrity.bad_chunks) == [3] and report.metrics()["integrity/bad_chunks"] == 1
    assert any("chunk 3: rows 96..127: logits unreadable (Stored and computed checksum" in line
               for line in report.lines())
    before = _chunk_files(good)

    ds, attrs = tiny_dataset(N), dict(open_store(good).attrs)  # every attribute, derived ones included
    stats = build(good, tiny_model(), ds, attrs=attrs, device=CPU, batch_size=BATCH, progress=False,
                  chunk_rows=attrs["chunk_rows"], chunks=report.chunks_to_rebuild(), force_chunks=True)
    assert stats.chunks_written == 1 and stats.rows_computed == CHUNK_ROWS
    after = _chunk_files(good)
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["chunk_done/c/3", "labels/c/3", "logits/c/3/0", "sample_ids/c/3"]
    assert victim.read_bytes() == original  # the rebuilt chunk is the one first written, bit for bit
    assert {k: v[0] for k, v in after.items() if k != "logits/c/3/0"} == {
        k: v[0] for k, v in before.items() if k != "logits/c/3/0"}  # the other objects hold the same bytes


def test_removed_objects_are_caught(good: Path) -> None:
    (good / "logits" / "c" / "5" / "0").unlink()  # reads back as the NaN fill value
    (good / "sample_ids" / "c" / "6").unlink()  # reads back as empty ids
    (good / "labels" / "c" / "7").unlink()  # reads back as the invalid label fill
    integrity = check_integrity(open_store(good))
    assert sorted(integrity.bad_chunks) == [5, 6, 7]
    assert "NaN/Inf" in integrity.bad_chunks[5] and "empty sample ids" in integrity.bad_chunks[6]
    assert "invalid labels" in integrity.bad_chunks[7]


def test_nan_row_fails_and_is_named(good: Path) -> None:
    logits = zarr.open_group(good, mode="r+")["logits"]
    row = logits[40]
    row[2] = np.nan
    logits[40] = row  # written through zarr: the checksum is valid, the value is not
    report = _verify(good, rows=0)
    assert not report.passed and list(report.integrity.bad_chunks) == [1]
    assert report.integrity.nonfinite_rows == [40] and report.integrity.nonfinite_count == 1
    assert any("1 row(s) with NaN/Inf logits, e.g. rows [40]" in line for line in report.lines())


def test_missing_sample_id_fails_coverage(good: Path) -> None:
    ids = tiny_dataset(N).sample_ids + ["ghost/1"]
    coverage = check_coverage(open_store(good), ids)
    assert not coverage.passed and coverage.missing == ["ghost/1"] and coverage.missing_count == 1
    assert coverage.hit_rate == pytest.approx(N / (N + 1))
    assert "missing 'ghost/1'" in coverage.lines()[0] and coverage.lines()[0].startswith("FAIL")
    assert check_coverage(open_store(good), ids[:N]).passed


def test_not_done_chunk_fails_and_resume_builds_only_it(good: Path) -> None:
    zarr.open_group(good, mode="r+")["chunk_done"][2] = False
    report = _verify(good, rows=0)
    assert not report.passed and report.integrity.not_done == [2] and not report.integrity.bad_chunks
    assert "FAIL integrity: 1 chunk(s) not done: [2]" in report.lines()
    with pytest.raises(CacheError, match="not done"):
        mark_complete(open_store(good, "r+"), None)
    before = _chunk_files(good)
    _build(good)
    after = _chunk_files(good)
    # only chunk 2 was computed and written again, to the same bytes; now every chunk is done (a False flag is
    # zarr's fill value, so it was no object at all)
    assert "chunk_done/c/2" not in before
    assert sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)) == [
        "chunk_done/c/2", "logits/c/2/0"]
    assert after["logits/c/2/0"][0] == before["logits/c/2/0"][0]
    assert zarr.open_group(good, mode="r")["chunk_done"][:].tolist() == [True] * (N // CHUNK_ROWS)


def test_fidelity_catches_consistently_rewritten_logits(good: Path) -> None:
    ds, impostor = tiny_dataset(N), tiny_model(seed=7)
    with torch.inference_mode():
        zarr.open_group(good, mode="r+")["logits"][64:96] = impostor(ds.batch(list(range(64, 96)))[0]).numpy()
    assert check_integrity(open_store(good)).passed  # checksums are valid: only recomputing can tell
    elsewhere = check_fidelity(open_store(good), tiny_model(), ds, rows=[0, 10, 200, 255], device=CPU)
    assert elsewhere.passed
    hit = check_fidelity(open_store(good), tiny_model(), ds, rows=[0, 70, 200], device=CPU)
    assert not hit.passed and hit.worst_sample_id == "tiny/70" and hit.max_abs_diff > 0.05
    assert hit.lines()[0].startswith("FAIL fidelity: 3 row(s)") and hit.bad_chunks == [2]
    report = _verify(good, rows=[5, 70, 71])
    assert report.repairable and report.chunks_to_rebuild() == [2]
    assert any(f.startswith("fidelity: 3 row(s) recomputed") for f in report.failures())


def test_fidelity_tolerance_by_dtype() -> None:
    assert fidelity_tolerance("float32", None, 0.5) == pytest.approx(1e-4)
    assert fidelity_tolerance("float32", None, 30.0) == pytest.approx(3e-3)
    assert fidelity_tolerance("float16", None, 30.0) == pytest.approx(30.0 / 1024 + 1e-3)
    assert fidelity_tolerance("float32", torch.bfloat16, 10.0) == pytest.approx(4 * 2.0**-7 * 10.0)


def test_float16_cache_passes_fidelity(tmp_path: Path) -> None:
    _build(tmp_path / "h.zarr", dtype="float16")
    report = _verify(tmp_path / "h.zarr")
    assert report.passed, report.lines()
    assert 0 < report.fidelity.max_abs_diff <= 2.0**-11 * report.fidelity.max_abs_logit  # half-ulp rounding


def test_signal_cache_verifies(tmp_path: Path) -> None:
    ds = tiny_dataset(N)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Unflatten(1, (4, 3))).eval()
    build(tmp_path / "s.zarr", model, ds, attrs=tiny_attrs(ds, (4, 3)), device=CPU, batch_size=BATCH,
          chunk_rows=CHUNK_ROWS, progress=False)
    report = verify_store(open_store(tmp_path / "s.zarr"), ds.sample_ids, model, ds, device=CPU, fidelity_rows=64)
    assert report.passed and report.fidelity.top1_agreement is None
    other = verify_store(open_store(tmp_path / "s.zarr"), ds.sample_ids, tiny_model(seed=1, out=12), ds, device=CPU)
    # a different signal teacher is caught by recomputing, without any top-1; the store itself is sound
    assert not other.passed and not other.fidelity.passed and other.fidelity.top1_agreement is None
    assert other.integrity.passed and other.coverage.passed
    assert [f.split(":")[0] for f in other.failures()] == ["fidelity"]


def test_open_store_refuses_missing_foreign_and_half_created(tmp_path: Path, good: Path) -> None:
    with pytest.raises(CacheError, match="no logit cache"):
        open_store(tmp_path / "absent.zarr")
    zarr.open_group(tmp_path / "foreign.zarr", mode="w", attributes={"format": "someone.else/2"})
    with pytest.raises(CacheError, match="not a kdtrack cache"):
        open_store(tmp_path / "foreign.zarr")
    zarr.open_group(good, mode="r+").update_attributes({"initialised": False})
    with pytest.raises(CacheError, match="never fully created"):
        open_store(good)


def test_corrupt_sample_ids_chunk_is_reported_not_raised(tmp_path):
    """A sample-id chunk that fails its checksum makes its samples unresolvable instead of crashing verify."""
    from kdtrack.cache.verify import check_coverage

    path = tmp_path / "ids.zarr"
    group = zarr.open_group(str(path), mode="w")
    ids = group.create_array("sample_ids", shape=(8,), chunks=(4,), dtype=str,
                             compressors=[zarr.codecs.Crc32cCodec()])
    ids[:] = np.array([f"s/{i}" for i in range(8)])
    group.attrs.update({"chunk_rows": 4, "num_rows": 8})
    chunk = path / "sample_ids" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = check_coverage(zarr.open_group(str(path)), [f"s/{i}" for i in range(8)])
    assert report.found == 4 and report.missing == [f"s/{i}" for i in range(4, 8)]
