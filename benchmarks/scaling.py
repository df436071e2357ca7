"""Scaling: cache build time and the build's peak memory at N, 4N and 16N rows, each build in its own process.

Run as `python -m benchmarks.scaling JOB_JSON` it is that child: it makes the data, resets the peak-RSS mark,
builds, and prints one JSON line with the build's seconds and the peak RSS above what it held before building.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import fixtures
from benchmarks.report import Figure, Result, Target
from benchmarks.settings import Settings
from kdtrack import cache
from kdtrack.data import dataset_digest

NAME = "scaling"
TIME_TARGET = Target("<=", 17.0)
MEMORY_TARGET = Target("<=", 1.5)
MULTIPLES = (1, 4, 16)
TEACHER = "mlp"  # cheap: the build's own work (gather, copy, encode, write) is a large share of the time
DTYPE = "float32"
REPO = Path(__file__).resolve().parents[1]


def run(settings: Settings) -> Result:
    """`scaling_repeats` rounds of builds at N, 4N, 16N (order alternating by round), one child process per build."""
    n = settings.scaling_rows
    raw: dict[str, list[float]] = {f"{kind}_{m}N": [] for kind in ("seconds", "peak_extra") for m in MULTIPLES}
    methods = set()
    for r in range(settings.scaling_repeats):
        for m in MULTIPLES if r % 2 == 0 else reversed(MULTIPLES):
            out = _run_child(settings, rows=m * n, name=f"scaling_{m}N_{r}.zarr")
            raw[f"seconds_{m}N"].append(out["seconds"])
            raw[f"peak_extra_{m}N"].append(out["peak_extra_bytes"])
            methods.add(out["peak_method"])
            if settings.torch_device.type == "cuda":
                raw.setdefault(f"device_peak_{m}N", []).append(out["device_peak_bytes"])
    row_bytes = settings.scaling_num_classes * 4
    figures = [Figure.ratio("build time 16N / N", raw, "seconds_16N", "seconds_1N", TIME_TARGET),
               Figure.ratio("build time 4N / N", raw, "seconds_4N", "seconds_1N"),
               Figure.ratio("peak build memory 16N / N", raw, "peak_extra_16N", "peak_extra_1N", MEMORY_TARGET),
               Figure("logits of 16N rows", 16 * n * row_bytes, "B", note="what a build holding them all would add"),
               Figure("peak growth / logits growth, N to 16N", _growth(raw, 15 * n * row_bytes), "x",
                      note="share of the added logits bytes that the build's peak memory grew by")]
    params = {"N": n, "teacher": TEACHER, "dtype": DTYPE, "num_classes": settings.scaling_num_classes,
              "input_shape": list(settings.scaling_input_shape), "batch_size": settings.build_batch,
              "peak_method": sorted(methods)}
    units = {k: "s" if k.startswith("seconds") else "B" for k in raw}  # device_peak: torch.cuda max allocated
    notes = [f"N = {n:,} rows of {settings.scaling_num_classes}-class {DTYPE} logits ({TEACHER} teacher), default "
             f"chunk rows; peak = highest RSS during the build minus RSS just before it ({', '.join(sorted(methods))})"]
    return Result(NAME, "Build scaling in rows", params, raw, units, figures, notes)


def _growth(raw: dict[str, list[float]], logits_added: int) -> float:
    """(median peak at 16N - median peak at N) / the logits bytes 15N more rows add."""
    return (statistics.median(raw["peak_extra_16N"]) - statistics.median(raw["peak_extra_1N"])) / logits_added


def _run_child(settings: Settings, *, rows: int, name: str) -> dict[str, Any]:
    job = {"rows": rows, "path": str(settings.workdir / name), "device": settings.device, "threads": settings.threads,
           "input_shape": list(settings.scaling_input_shape), "num_classes": settings.scaling_num_classes,
           "batch_size": settings.build_batch}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "benchmarks.scaling", json.dumps(job)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"scaling child for {rows} rows failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Build one store of `job["rows"]` rows; return its seconds and the peak RSS the build added."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    ds = fixtures.dataset(job["rows"], job["input_shape"], job["num_classes"])
    teacher = fixtures.model(TEACHER, ds, device).eval()
    digest = dataset_digest(ds)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method = _reset_peak()
    before = _rss_bytes() if method == "VmHWM" else _maxrss_bytes()
    start = time.perf_counter()
    fixtures.build_cache(Path(job["path"]), TEACHER, teacher, ds, device, batch_size=job["batch_size"], dtype=DTYPE,
                         digest=digest)
    seconds = time.perf_counter() - start
    peak = _hwm_bytes() if method == "VmHWM" else _maxrss_bytes()
    cache.remove_store(job["path"])
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    # the kernel's RSS counters are kept per thread and summed lazily (a few pages behind), so a build that added
    # nothing can read a few pages below its start: that is no memory added, not negative memory
    return {"rows": job["rows"], "seconds": seconds, "peak_extra_bytes": max(peak - before, 0),
            "rss_before_bytes": before, "device_peak_bytes": device_peak, "peak_method": method}


def _reset_peak() -> str:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); else fall back to ru_maxrss, which cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _hwm_bytes() -> int:
    return _status_bytes("VmHWM")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
