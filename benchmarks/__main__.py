"""`python -m benchmarks [--quick] [--device cuda] [--scale large] [--only NAME] [--out DIR|FILE.json]`."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import (cache_build, data_loading, epoch_cost, lookup, machine, over_budget, scaling, storage,
                        tracking_overhead)
from benchmarks.report import Report
from benchmarks.settings import SCALES, make_settings
from kdtrack.errors import BadInput, KdtrackError

BENCHMARKS = {m.NAME: m for m in (epoch_cost, cache_build, lookup, storage, tracking_overhead, scaling, data_loading,
                                  over_budget)}
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, write the JSON report, print the table; exit 1 only with --strict and a miss."""
    args = _parser().parse_args(argv)
    names = _selected(args.only)
    scale = "quick" if args.quick else args.scale
    threads = args.threads or _usable_cores()
    torch.set_num_threads(threads)  # the same for every variant and for the scaling children
    started, created = time.perf_counter(), datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="kdtrack-bench-", dir=args.workdir) as tmp:
        settings = make_settings(scale, device=args.device, threads=threads, workdir=Path(tmp), repeats=args.repeats)
        device = settings.torch_device  # an unavailable device fails here, before any work
        where = machine.describe(device)
        results = []
        for name in names:
            print(f"[{name}] running ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            results.append(BENCHMARKS[name].run(settings))
            print(f"[{name}] done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    where["load_average_end"] = machine.load_average()
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))  # the interpreter and every argument, as typed
    report = Report(command=command, created_at=created.isoformat(timespec="seconds"), machine=where,
                    versions=machine.versions(), settings=settings.to_dict(), results=results,
                    seconds=time.perf_counter() - started)
    path = _out_path(args.out, created, scale, device)
    report.write(path)
    print(report.table())
    print(f"\nreport: {path}")
    return 1 if args.strict and not report.passed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check in seconds (overrides --scale)")
    p.add_argument("--scale", choices=[s for s in SCALES if s != "quick"], default="small",
                   help="small: CPU sizes, a few minutes; large: the realistic pair and sizes, for a GPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these (repeatable or comma-separated): {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for <date>-<host>.json, or a .json file path (default: benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per variant (default: per scale)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder for stores (default: system temp)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    return p


def _selected(only: list[str]) -> list[str]:
    names = [n.strip() for item in only for n in item.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise BadInput(f"unknown benchmark {unknown[0]!r}", f"choose from: {', '.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n in names]  # suite order, each once


def _out_path(out: Path, created: datetime.datetime, scale: str, device: torch.device) -> Path:
    if out.suffix == ".json":
        return out
    suffix = "" if (scale, device.type) == ("small", "cpu") else f"-{scale}-{device.type}"
    return out / f"{created:%Y-%m-%d}-{socket.gethostname()}{suffix}.json"


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KdtrackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
