"""Cache verification: integrity (checksums, NaN, done flags), coverage, fidelity, repair, completion, opening."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from cache_build_child import BATCH, CHUNK_ROWS, tiny_attrs, tiny_dataset, tiny_model

from kdtrack.cache import (FidelityReport, IntegrityReport, build, check_coverage, check_fidelity, check_integrity,
                           fidelity_tolerance, mark_complete, mark_incomplete, open_store, sample_rows, verify_store)
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
    lines = report.lines()
    assert lines[:2] == ["PASS integrity: 8 chunk(s) done, readable, checksums valid, logits finite",
                         "PASS coverage: 256/256 sample ids found (hit rate 100.00%)"]
    assert lines[2].startswith("PASS fidelity: 256 row(s) recomputed") and lines[3] == "cache verification PASSED"
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
    assert changed == ["chunk_done/c/3", "labels/c/3", "logits/c/3/0", "sample_ids/c/3", "sample_ids_utf8/c/3/0"]
    assert victim.read_bytes() == original  # the rebuilt chunk is the one first written, bit for bit
    assert {k: v[0] for k, v in after.items() if k != "logits/c/3/0"} == {
        k: v[0] for k, v in before.items() if k != "logits/c/3/0"}  # the other objects hold the same bytes


def test_removed_objects_are_caught(good: Path) -> None:
    (good / "logits" / "c" / "5" / "0").unlink()  # reads back as the NaN fill value
    (good / "sample_ids" / "c" / "6").unlink()  # reads back as empty ids
    (good / "labels" / "c" / "7").unlink()  # reads back as the invalid label fill
    (good / "sample_ids_utf8" / "c" / "4" / "0").unlink()  # reads back as zero bytes: empty ids
    integrity = check_integrity(open_store(good))
    assert sorted(integrity.bad_chunks) == [4, 5, 6, 7]
    assert integrity.bad_chunks[4] == "rows 128..159: empty sample_ids_utf8 (object removed?)"
    assert "NaN/Inf" in integrity.bad_chunks[5] and "empty sample ids" in integrity.bad_chunks[6]
    assert "invalid labels" in integrity.bad_chunks[7]


def test_byte_ids_that_disagree_with_the_string_ids_fail_and_are_repaired(good: Path) -> None:
    """`sample_ids_utf8` (what tensorstore reads) must hold the ids `sample_ids` holds; a rebuild of the chunk
    restores them."""
    array = zarr.open_group(good, mode="r+")["sample_ids_utf8"]
    rows = array[40:42]
    rows[:, [0, 1]] = rows[:, [1, 0]]  # "tiny/40" -> "itny/40": checksum valid, id wrong
    array[40:42] = rows
    report = _verify(good, rows=0)
    assert report.integrity.bad_chunks == {1: "rows 32..63: sample_ids_utf8 disagrees with sample_ids"}
    assert report.repairable and report.chunks_to_rebuild() == [1]
    ds, attrs = tiny_dataset(N), dict(open_store(good).attrs)
    build(good, tiny_model(), ds, attrs=attrs, device=CPU, batch_size=BATCH, progress=False,
          chunk_rows=attrs["chunk_rows"], chunks=[1], force_chunks=True)
    fixed = zarr.open_group(good, mode="r")["sample_ids_utf8"][40:42]
    assert [bytes(r).rstrip(b"\0").decode() for r in fixed] == ["tiny/40", "tiny/41"]
    assert _verify(good, rows=0).passed


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
    other = verify_store(open_store(tmp_path / "s.zarr"), ds.sample_ids, tiny_model(seed=1, out=12), ds, device=CPU,
                         fidelity_rows=N)
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


B = [0.5, 0.25, -0.5, 0.125, 0.0]  # a constant teacher's logits: exact in float32, float16 and bfloat16


def _constant(values: list[float]) -> torch.nn.Module:
    """A teacher that ignores its input: every row's logits are `values`."""
    linear = torch.nn.Linear(16, len(values))
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor(values))
    return torch.nn.Sequential(torch.nn.Flatten(), linear).eval()


def _write_rows(path: Path, rows: dict[int, list[float]]) -> zarr.Group:
    """Overwrite cache rows through zarr (valid checksums); the store, opened for reading."""
    logits = zarr.open_group(path, mode="r+")["logits"]
    for row, values in rows.items():
        logits[row] = np.asarray(values, dtype=np.float32)
    return open_store(path)


def test_integrity_lines_name_every_kind_of_problem() -> None:
    """One FAIL line per schema error and per bad chunk (in chunk order); lists longer than ten end in '...'."""
    report = IntegrityReport(chunks_checked=12, schema_errors=["labels has shape (3,), attributes say (4,)"],
                             bad_chunks={7: "rows 7..7: x", 2: "rows 2..2: y"}, not_done=list(range(11)),
                             nonfinite_rows=[3, 4], nonfinite_count=5)
    assert report.lines() == ["FAIL integrity: labels has shape (3,), attributes say (4,)",
                              "FAIL integrity: chunk 2: rows 2..2: y",
                              "FAIL integrity: chunk 7: rows 7..7: x",
                              "FAIL integrity: 11 chunk(s) not done: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...]",
                              "FAIL integrity: 5 row(s) with NaN/Inf logits, e.g. rows [3, 4]"]
    assert IntegrityReport(chunks_checked=10, not_done=list(range(10))).lines() == [
        "FAIL integrity: 10 chunk(s) not done: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"]


def test_store_that_disagrees_with_its_attributes_fails_before_reading_chunks(good: Path) -> None:
    """Shapes and dtype are checked against the attributes; a missing array is named alone."""
    group = zarr.open_group(good, mode="r+")
    group.update_attributes({"num_rows": N + 1, "dtype": "float16"})
    report = check_integrity(group)
    assert report.lines() == ["FAIL integrity: logits has shape (256, 5), attributes say (257, 5)",
                              "FAIL integrity: sample_ids has shape (256,), attributes say (257,)",
                              "FAIL integrity: sample_ids_utf8 has shape (256, 8), attributes say (257, 8)",
                              "FAIL integrity: labels has shape (256,), attributes say (257,)",
                              "FAIL integrity: chunk_done has shape (8,), attributes say (9,)",
                              "FAIL integrity: logits are float32, attributes say float16"]
    assert report.chunks_checked == 9 and not report.bad_chunks and not report.not_done
    shutil.rmtree(good / "labels")
    assert check_integrity(zarr.open_group(good, mode="r")).lines() == [
        "FAIL integrity: arrays ['labels'] are missing"]


def test_utf8_ids_of_any_width_but_not_of_another_rank_pass_the_schema(good: Path) -> None:
    """`sample_ids_utf8` is (rows, width) for any width: one of one dimension or of three is a schema error."""
    group = zarr.open_group(good, mode="r+")
    for shape, error in (((N, 3), None), ((N,), f"shape ({N},), attributes say ({N}, 0)"),
                         ((N, 8, 2), f"shape ({N}, 8, 2), attributes say ({N}, 8)")):
        group.create_array("sample_ids_utf8", shape=shape, dtype="uint8", overwrite=True)
        assert check_integrity(group).schema_errors == ([f"sample_ids_utf8 has {error}"] if error else [])


def test_every_finding_of_every_chunk_is_named(good: Path) -> None:
    """Each chunk's reason lists all its problems; NaN rows are counted over all chunks, the first ten named."""
    group = zarr.open_group(good, mode="r+")
    rows = group["logits"][40:43]
    rows[:, 0] = np.inf
    group["logits"][40:43] = rows  # chunk 1: three bad rows of 32
    row = group["logits"][230]
    row[1] = np.nan
    group["logits"][230] = row  # chunk 7: one bad row ...
    (good / "labels" / "c" / "7").unlink()  # ... and its labels gone
    (good / "logits" / "c" / "5" / "0").unlink()  # chunk 5: every row reads as the NaN fill
    victim = good / "logits" / "c" / "6" / "0"
    data = bytearray(victim.read_bytes())
    data[17] ^= 0xFF
    victim.write_bytes(bytes(data))  # chunk 6: logits fail their checksum ...
    (good / "sample_ids" / "c" / "6").unlink()  # ... and its ids are gone
    group["chunk_done"][2] = False
    group["chunk_done"][4] = False
    report = _verify(good, rows=0)
    integrity = report.integrity
    assert integrity.not_done == [2, 4] and sorted(integrity.bad_chunks) == [1, 5, 6, 7]
    assert integrity.bad_chunks[1] == "rows 32..63: 3 row(s) with NaN/Inf logits"
    assert integrity.bad_chunks[5] == "rows 160..191: 32 row(s) with NaN/Inf logits (NaN fill: object removed?)"
    assert re.fullmatch(r"rows 192\.\.223: logits unreadable \(Stored and computed checksum[^;]*\); "
                        r"empty sample ids \(object removed\?\)", integrity.bad_chunks[6])
    assert integrity.bad_chunks[7] == "rows 224..255: 1 row(s) with NaN/Inf logits; invalid labels (object removed?)"
    assert integrity.nonfinite_count == 3 + 32 + 1
    assert integrity.nonfinite_rows == [40, 41, 42, 160, 161, 162, 163, 164, 165, 166]
    assert ("FAIL integrity: 36 row(s) with NaN/Inf logits, e.g. rows [40, 41, 42, 160, 161, 162, 163, 164, 165, 166]"
            in report.lines())
    assert "FAIL integrity: 2 chunk(s) not done: [2, 4]" in report.lines()
    # chunk 6's ids are unreadable, so its samples do not resolve either: the store is not repairable by chunks
    assert report.coverage.missing_count == 32 and not report.repairable
    assert report.fidelity is None and report.fidelity_dict() is None
    assert report.chunks_to_rebuild() == [1, 2, 4, 5, 6, 7]
    assert report.lines()[-1] == "cache verification FAILED"


def test_unreadable_chunk_reason_is_the_first_line_of_the_error(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error without a message is named by its type; a long message is cut to its first 160 characters."""
    read = zarr.Array.__getitem__
    errors = {32: OSError(), 64: OSError("x" * 200 + "\nsecond line")}  # by the first row of the chunk read

    def failing_labels(self, selection):
        if self.path == "labels" and isinstance(selection, slice) and selection.start in errors:
            raise errors[selection.start]
        return read(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", failing_labels)
    report = check_integrity(open_store(good))
    assert report.bad_chunks == {1: "rows 32..63: labels unreadable (OSError)",
                                 2: f"rows 64..95: labels unreadable ({'x' * 160})"}


def test_coverage_names_the_first_missing_ids_and_counts_repeated_ids(good: Path) -> None:
    """Up to ten missing ids are named, then a count; store rows repeating an earlier id are counted."""
    group = zarr.open_group(good, mode="r+")
    group["sample_ids"][5] = "tiny/4"
    group["sample_ids"][9] = "tiny/4"
    ghosts = [f"ghost/{i}" for i in range(11)]
    coverage = check_coverage(open_store(good), tiny_dataset(N).sample_ids + ghosts)
    assert (coverage.requested, coverage.found, coverage.missing_count, coverage.duplicate_ids) == (267, 254, 13, 2)
    assert coverage.lines() == [
        "FAIL coverage: 254/267 sample ids found (hit rate 95.13%); missing 'tiny/5', 'tiny/9', 'ghost/0', "
        "'ghost/1', 'ghost/2', 'ghost/3', 'ghost/4', 'ghost/5', 'ghost/6', 'ghost/7' and 3 more",
        "FAIL coverage: 2 store row(s) repeat an earlier sample id"]
    ten = ", ".join(f"'ghost/{i}'" for i in range(10))
    assert check_coverage(open_store(good), ghosts[:10]).lines()[0] == (
        f"FAIL coverage: 0/10 sample ids found (hit rate 0.00%); missing {ten}")


def test_ids_after_an_unreadable_id_chunk_still_resolve(good: Path) -> None:
    """Only the samples of the id chunk that fails its checksum are missing."""
    victim = good / "sample_ids" / "c" / "1"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    coverage = check_coverage(open_store(good), tiny_dataset(N).sample_ids)
    assert coverage.found == N - CHUNK_ROWS and coverage.missing_count == CHUNK_ROWS
    assert coverage.missing == [f"tiny/{i}" for i in range(32, 42)]


def test_sampled_rows_are_distinct_sorted_and_seeded() -> None:
    """min(k, n) distinct rows in increasing order; the same seed gives the same rows, another seed others."""
    assert sample_rows(10, 25, seed=4).tolist() == list(range(10))
    assert sample_rows(10, 10, seed=4).tolist() == list(range(10))
    picked = sample_rows(1000, 20, seed=4).tolist()
    assert picked == sorted(set(picked)) and len(picked) == 20 and 0 <= picked[0] and picked[-1] < 1000
    assert sample_rows(1000, 20, seed=4).tolist() == picked != sample_rows(1000, 20, seed=5).tolist()


def test_fidelity_figures_of_a_constant_teacher(good: Path) -> None:
    """Per-row |diff| equal to the tolerance passes; a cached winner within the tolerance of the cached maximum
    counts as top-1 agreement even when the row fails on |diff|; rows are read chunk by chunk."""
    tol32 = float(np.float32(1e-4))  # the float32 tolerance the float32 diffs are compared with
    near_tie = float(np.float32(1.0) - np.float32(1e-4))
    group = _write_rows(good, {40: B, 70: [near_tie, 1.0, -0.5, 0.125, 0.0], 100: [*B[:4], tol32]})
    teacher, ds = _constant(B), tiny_dataset(N)
    report = check_fidelity(group, teacher, ds, rows=[40, 70, 100], device=CPU)
    assert (report.rows_checked, report.max_abs_diff, report.max_abs_logit) == (3, 0.75, 0.5)
    assert report.tolerance == pytest.approx(1e-4) and report.top1_agreement == 1.0
    assert report.bad_chunks == [2] and report.worst_sample_id == "tiny/70" and not report.passed
    assert report.lines() == [
        "FAIL fidelity: 3 row(s) recomputed, max |diff| 0.75 (tolerance 0.0001, max |logit| 0.5), "
        "top-1 agreement 100.00% (worst: 'tiny/70')"]
    assert check_fidelity(group, teacher, ds, rows=np.array([40.0, 70.0, 100.0]), device=CPU) == report
    one = check_fidelity(group, teacher, ds, rows=[40], device=CPU)
    assert one.lines() == ["PASS fidelity: 1 row(s) recomputed, max |diff| 0 (tolerance 0.0001, max |logit| 0.5), "
                           "top-1 agreement 100.00%"]
    assert one.to_dict() == {"rows_checked": 1, "max_abs_diff": 0.0, "max_abs_logit": 0.5,
                             "tolerance": pytest.approx(1e-4), "top1_agreement": 1.0, "passed": True}


def test_fidelity_reads_each_chunk_once(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled rows are read with one selection per chunk they fall in, whatever their order."""
    selections = []
    read = zarr.Array.get_orthogonal_selection

    def counted(self, selection, *args, **kwargs):
        if self.path == "logits":
            selections.append(np.asarray(selection[0]).tolist())
        return read(self, selection, *args, **kwargs)

    monkeypatch.setattr(zarr.Array, "get_orthogonal_selection", counted)
    report = check_fidelity(open_store(good), tiny_model(), tiny_dataset(N), rows=[72, 33, 70, 40, 71], device=CPU)
    assert report.passed and selections == [[33, 40], [70, 71, 72]]


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_fidelity_under_autocast_recomputes_and_tolerates_in_that_format(good: Path, amp: torch.dtype) -> None:
    """With amp_dtype the teacher is recomputed under autocast to that format, and the tolerance is a few of its
    epsilons: a constant teacher whose cached row is off by exactly that much passes, and fails without autocast."""
    ds, model = tiny_dataset(N), tiny_model()
    cached = zarr.open_group(good, mode="r")["logits"][32:64]
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp):
        fresh = model(ds.batch(list(range(32, 64)))[0]).float().numpy()
    expected = float(np.abs(fresh - cached).max())
    assert expected > 1e-4  # autocast rounding is visible against the float32 cache
    report = check_fidelity(open_store(good), model, ds, rows=list(range(32, 64)), device=CPU, amp_dtype=amp)
    assert report.max_abs_diff == pytest.approx(expected, rel=1e-6) and report.passed
    eps = torch.finfo(amp).eps
    assert report.tolerance == pytest.approx(4 * eps * max(1.0, float(np.abs(fresh).max())))

    off = [v + 4 * eps for v in B]  # exact: B and 4 * eps are powers of two apart
    group = _write_rows(good, {130: off})
    tolerated = verify_store(group, ds.sample_ids, _constant(B), ds, device=CPU, fidelity_rows=[130], amp_dtype=amp)
    assert tolerated.fidelity.max_abs_diff == tolerated.fidelity.tolerance == 4 * eps and tolerated.passed
    assert not check_fidelity(group, _constant(B), ds, rows=[130], device=CPU).passed


def test_teacher_that_outputs_nan_fails_fidelity_without_crashing(good: Path) -> None:
    """NaN outputs count as infinitely far from the cache; the logged figures leave the non-finite ones out."""
    report = _verify(good, model=_constant([float("nan")] * 5), rows=[0, 40])
    fidelity = report.fidelity
    assert fidelity.max_abs_diff == np.inf and fidelity.max_abs_logit == 0.0 and fidelity.bad_chunks == [0, 1]
    assert not fidelity.passed and fidelity.to_dict()["max_abs_diff"] is None
    assert fidelity.to_dict()["max_abs_logit"] == 0.0 and fidelity.to_dict()["rows_checked"] == 2
    assert "fidelity/max_abs_diff" not in report.metrics() and report.metrics()["fidelity/max_abs_logit"] == 0.0


def test_sampled_rows_missing_from_the_cache_are_counted_not_compared(good: Path) -> None:
    """Rows whose ids the cache lacks are left out of the comparison and counted; with none left, the check fails."""
    zarr.open_group(good, mode="r+")["sample_ids"][0:2] = np.array(["gone/0", "gone/1"])
    group, ds = open_store(good), tiny_dataset(N)
    none_left = check_fidelity(group, tiny_model(), ds, rows=[0, 1], device=CPU)
    assert none_left == FidelityReport(rows_checked=0, max_abs_diff=0.0, max_abs_logit=0.0, tolerance=1e-4,
                                       top1_agreement=None, worst_sample_id=None, missing_ids=2, bad_chunks=[])
    assert none_left.lines() == ["FAIL fidelity: 0 row(s) recomputed, max |diff| 0 (tolerance 0.0001, max |logit| 0), "
                                 "2 sampled id(s) not in the cache"]
    one_left = check_fidelity(group, tiny_model(), ds, rows=[0, 40], device=CPU)
    assert one_left.rows_checked == 1 and one_left.missing_ids == 1 and not one_left.passed
    assert one_left.lines()[0].endswith(", 1 sampled id(s) not in the cache (worst: 'tiny/40')")


def test_signal_report_has_no_top1_figure() -> None:
    """Without a top-1 figure the line omits it and the dict holds None."""
    report = FidelityReport(rows_checked=4, max_abs_diff=0.5, max_abs_logit=2.0, tolerance=1e-4, top1_agreement=None,
                            worst_sample_id="a/1")
    assert report.lines() == ["FAIL fidelity: 4 row(s) recomputed, max |diff| 0.5 (tolerance 0.0001, max |logit| 2) "
                              "(worst: 'a/1')"]
    assert report.to_dict() == {"rows_checked": 4, "max_abs_diff": 0.5, "max_abs_logit": 2.0, "tolerance": 1e-4,
                                "top1_agreement": None, "passed": False}


def test_store_built_for_other_data_or_checkpoint_is_named_and_not_recomputed(good: Path) -> None:
    """Provenance lines name both hashes by their first 12 characters; other data skips fidelity, the same runs it."""
    zarr.open_group(good, mode="r+").update_attributes({"checkpoint_sha256": "0123456789abcdef" * 4})
    built_for = zarr.open_group(good, mode="r").attrs["dataset_digest"]
    report = _verify(good, rows=4, expected_checkpoint="f" * 64, data_digest="e" * 64)
    assert report.provenance == [
        "the cache was built from checkpoint 0123456789ab, not the expected ffffffffffff",
        f"the data changed since this cache was built: digest now eeeeeeeeeeee, cache built for {built_for[:12]}"]
    assert report.fidelity is None and not report.passed
    same = _verify(good, rows=4, expected_checkpoint="0123456789abcdef" * 4, data_digest=built_for)
    assert same.provenance == [] and same.fidelity.rows_checked == 4 and same.passed


def test_fidelity_needs_both_a_model_and_a_dataset(good: Path) -> None:
    """Without a model or without a dataset only integrity and coverage run."""
    ds, group = tiny_dataset(N), open_store(good)
    for model, dataset in ((None, ds), (tiny_model(), None), (None, None)):
        report = verify_store(group, ds.sample_ids, model, dataset, device=CPU, fidelity_rows=4)
        assert report.fidelity is None and report.passed


@pytest.mark.slow  # recomputes fidelity rows over several seeds (over a second on 2 cores)
def test_counted_fidelity_rows_are_seeded_by_default_with_zero(good: Path) -> None:
    """A count of rows draws them with `seed` (default 0): the same seed checks the same rows, another seed others."""
    offsets = {r: [v + r / 1024 for v in B] for r in range(N)}  # row r is off by r/1024: the worst row is the last
    group, ds, teacher = _write_rows(good, offsets), tiny_dataset(N), _constant(B)

    def worst(**kw) -> str:
        report = verify_store(group, ds.sample_ids, teacher, ds, device=CPU, fidelity_rows=5, **kw).fidelity
        assert report.rows_checked == 5 and report.max_abs_diff == int(report.worst_sample_id.split("/")[1]) / 1024
        return report.worst_sample_id

    assert worst() == worst(seed=0) == worst(seed=0) != worst(seed=1)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_teacher_with_zero_size_outputs_verifies(tmp_path: Path) -> None:
    """Outputs with no elements, e.g. shape (0, 3), compare as no difference instead of failing on an empty max."""
    ds = tiny_dataset(64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 0), torch.nn.Unflatten(1, (0, 3))).eval()
    build(tmp_path / "e.zarr", model, ds, attrs=tiny_attrs(ds, (0, 3)), device=CPU, batch_size=BATCH,
          chunk_rows=CHUNK_ROWS, progress=False)
    report = check_fidelity(open_store(tmp_path / "e.zarr"), model, ds, rows=[0, 40], device=CPU)
    assert (report.rows_checked, report.max_abs_diff, report.top1_agreement, report.bad_chunks) == (2, 0.0, None, [])
    assert report.passed
