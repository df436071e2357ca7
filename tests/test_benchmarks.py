"""Benchmark suite code paths on tiny sizes: well-formed results, ratios from the raw timings, the report file,
the per-sample .npy baseline, and `python -m benchmarks --quick`. No timing thresholds: these are not timing tests."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO, subprocess_env

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks import (cache_build, epoch_cost, fixtures, lookup, scaling, storage,  # noqa: E402
                        tracking_overhead)
from benchmarks.__main__ import BENCHMARKS  # noqa: E402
from benchmarks.lookup import NpyPerSample  # noqa: E402
from benchmarks.report import Figure, Report, Result, Target  # noqa: E402
from benchmarks.settings import make_settings  # noqa: E402
from kdtrack.cache import LogitTable  # noqa: E402

TINY = dict(input_shape=(3, 8, 8), num_classes=10, teacher="mlp", student="mlp", epoch_rows=64, train_batch=32,
            build_rows=96, build_batch=32, lookup_rows=1_200, lookup_batch=16, lookup_rounds=3, storage_rows=300, scaling_rows=64,
            scaling_input_shape=(1, 4, 4), scaling_num_classes=20)


def tiny_settings(tmp_path: Path):
    return make_settings("quick", device="cpu", threads=1, workdir=tmp_path, repeats=2, **TINY)


def by_hand_median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def check_well_formed(r: Result, rounds: int | None) -> None:
    assert r.raw and r.figures and r.title and r.notes
    assert set(r.units) == set(r.raw)
    for series, values in r.raw.items():
        assert values and all(math.isfinite(v) and v >= 0 for v in values), series
        if rounds is not None:
            assert len(values) == rounds, series
    for f in r.figures:
        assert math.isfinite(f.value), f.name
        if f.numerator is not None:  # a ratio figure: the median of one raw series over another's
            expected = by_hand_median(r.raw[f.numerator]) / by_hand_median(r.raw[f.denominator])
            assert f.value == pytest.approx(expected, rel=1e-12), f.name
        assert f.passed == (None if f.target is None else f.target.holds(f.value))
    json.dumps(Report("cmd", "now", {}, {}, {}, [r]).to_dict(), allow_nan=False)  # plain JSON, no NaN


SERIES = {
    epoch_cost: {"plain", "cached", "online"},
    cache_build: {"build", "forward"},
    lookup: {"table", "npy_per_sample", "zarr_oindex"},
    storage: {"float32", "float32 packed", "float32 raw logits", "float16", "float16 packed", "float16 raw logits"},
    tracking_overhead: {"logging_off", "logging_on", "log_metrics_call"},
}


@pytest.mark.slow  # runs each benchmark at tiny sizes (~4 s in all on 2 cores)
@pytest.mark.parametrize("module", list(SERIES), ids=lambda m: m.NAME)
def test_benchmark_returns_a_well_formed_result(tmp_path: Path, module) -> None:
    settings = tiny_settings(tmp_path)
    r = module.run(settings)
    assert r.name == module.NAME and set(r.raw) == SERIES[module]
    check_well_formed(r, 1 if module is storage else settings.lookup_rounds if module is lookup else 2)
    targets = [f.target for f in r.figures if f.target is not None]
    assert targets == ([module.TARGET] if hasattr(module, "TARGET") else [])


def test_scaling_child_reports_one_build(tmp_path: Path) -> None:
    job = {"rows": 48, "path": str(tmp_path / "s.zarr"), "device": "cpu", "threads": 1, "input_shape": [1, 4, 4],
           "num_classes": 20, "batch_size": 16}
    out = scaling.child(job)
    assert out["rows"] == 48 and out["seconds"] > 0 and out["peak_method"] in ("VmHWM", "ru_maxrss")
    assert out["peak_extra_bytes"] >= 0 and out["rss_before_bytes"] > 0
    assert not (tmp_path / "s.zarr").exists()  # each child removes its store


def test_scaling_child_reports_no_memory_added_when_the_peak_reads_below_the_start(tmp_path: Path, monkeypatch) -> None:
    """Lazily summed RSS counters can put the peak a few pages below the start: no memory added, not negative."""
    monkeypatch.setattr(scaling, "_reset_peak", lambda: "VmHWM")
    monkeypatch.setattr(scaling, "_rss_bytes", lambda: 2**30)
    monkeypatch.setattr(scaling, "_hwm_bytes", lambda: 2**30 - 16384)
    job = {"rows": 16, "path": str(tmp_path / "s.zarr"), "device": "cpu", "threads": 1, "input_shape": [1, 4, 4],
           "num_classes": 5, "batch_size": 16}
    assert scaling.child(job)["peak_extra_bytes"] == 0


def test_ratio_figure_and_target_by_hand() -> None:
    raw = {"a": [2.0, 9.0, 6.0], "b": [1.0, 3.0, 2.0]}
    f = Figure.ratio("a / b", raw, "a", "b", Target("<=", 2.5))
    assert f.value == 3.0  # medians 6 / 2
    assert f.spread == (2.5, 3.0)  # per-round ratios 2, 3, 3
    assert f.passed is False
    assert Target(">=", 0.9).holds(0.9) and not Target(">=", 0.9).holds(math.nan)


def test_report_round_trips_through_json(tmp_path: Path) -> None:
    raw = {"x": [1.0, 2.0], "y": [0.5, 1.0]}
    result = Result("demo", "Demo", {"rows": 3}, raw, {"x": "s", "y": "s"},
                    [Figure.ratio("x / y", raw, "x", "y", Target("<=", 1.05)), Figure("size", 12.5, "B", note="n")],
                    ["a note"])
    report = Report("python -m benchmarks --quick", "2026-01-01T00:00:00+00:00", {"cpu_model": "c"},
                    {"torch": "t"}, {"scale": "quick"}, [result], seconds=1.5)
    path = tmp_path / "r.json"
    report.write(path)
    loaded = Report.load(path)
    assert loaded.to_dict() == report.to_dict()
    assert loaded.results[0].figures == result.figures
    assert loaded.passed is False and json.loads(path.read_text())["results"][0]["figures"][0]["passed"] is False
    table = loaded.table()
    assert "x / y" in table and "FAIL" in table and "reported" in table


def test_npy_baseline_reads_exactly_the_table_numbers(tmp_path: Path) -> None:
    rows = 1_500  # more than one folder of files
    store, root = tmp_path / "c.zarr", tmp_path / "npy"
    fixtures.random_store(store, rows, 7, "float16")
    ids = [f"synthetic/{i}" for i in range(rows)]
    logits = zarr.open_group(store, mode="r")["logits"]
    NpyPerSample.write(root, ids, logits)
    npy, table = NpyPerSample(root), LogitTable.open(store, expected_digest=fixtures.RANDOM_DIGEST)
    picks = np.random.default_rng(3).choice(rows, size=64, replace=False)
    from_npy = npy.batch([ids[i] for i in picks.tolist()])
    assert from_npy.dtype == np.float32 and from_npy.shape == (64, 7)
    assert np.array_equal(from_npy, table[torch.from_numpy(picks)].numpy())
    assert np.array_equal(from_npy, np.asarray(logits.oindex[picks]).astype(np.float32))
    assert len(json.loads((root / "index.json").read_text())) == rows
    saved = io.BytesIO()
    np.save(saved, np.asarray(logits[1234]))
    assert (root / npy.index["synthetic/1234"]).read_bytes() == saved.getvalue()  # what np.save writes


@pytest.mark.slow  # `python -m benchmarks --quick` as a process: every benchmark
def test_quick_cli_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out", str(out),
                           "--workdir", str(tmp_path)], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = Report.load(out)
    assert [r.name for r in report.results] == list(BENCHMARKS)
    for r in report.results:
        check_well_formed(r, None)
    assert "--quick" in report.command and report.settings["scale"] == "quick"
    assert {"cpu_model", "logical_cores", "gpu"} <= set(report.machine)
    assert {"python", "torch", "zarr", "numpy", "mlflow", "kdtrack"} <= set(report.versions)
    assert "epoch_cost" in done.stdout and "target" in done.stdout
    assert not any(p.name.startswith("kdtrack-bench-") for p in tmp_path.iterdir())  # scratch folder removed
