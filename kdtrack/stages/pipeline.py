"""The whole chain under one parent run: teacher -> cache -> students, each step reused when nothing it depends
on changed (same entry point, same resolved config by value, same upstream runs, same code version)."""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdtrack import config, tracking
from kdtrack.config import Config
from kdtrack.errors import BadInput
from kdtrack.stages import cache_logits, train_student, train_teacher

T = tracking.TAG
STEPS = ("teacher", "cache", "students")
FEATURE_METHODS = ("fitnet", "rkd", "ft", "at")
# The config each step depends on; anything else may change without rerunning it.
TEACHER_KEYS = ("seed", "device", "data", "model", "optim", "train")
CACHE_KEYS = ("device", "data", "cache", "train")
STUDENT_KEYS = ("seed", "device", "data", "cache", "train", "method", "teacher_mode", "student", "kd")


@dataclass
class Step:
    name: str
    run_id: str
    reused: bool


def run(cfg: Config, students: list[str], *, force: str | None = None) -> str:
    """Teacher, cache and one student per method in `students` as child runs of a `pipeline` run; reused steps
    are linked, not rerun. `force` reruns that step ("teacher", "cache" or "students") and all after it."""
    if force is not None and force not in STEPS:
        raise BadInput(f"--force {force!r} is not a step", f"choose one of: {', '.join(STEPS)}")
    forced = set(STEPS[STEPS.index(force):]) if force else set()
    version = tracking.code_version()
    if "-dirty" in version:
        print("note: the working tree has uncommitted changes; steps are reused only with these exact changes",
              file=sys.stderr)
    with tracking.stage_run("pipeline", cfg, run_name=f"pipeline-{cfg.experiment}",
                            description=f"Teacher, cache and students ({', '.join(students)}) of {cfg.experiment}.") \
            as parent:
        teacher, cache = teacher_and_cache(cfg, version, forced)
        steps = [teacher, cache]
        for method in students:
            student_cfg = student_config(cfg, method)
            steps.append(run_step(f"student-{method}", student_cfg, STUDENT_KEYS,
                                  [teacher.run_id, cache.run_id], version, "students" in forced,
                                  lambda c=student_cfg: train_student.run(c, [teacher.run_id])))
        parent.set_tags({f"{T}steps": json.dumps({s.name: [s.run_id, s.reused] for s in steps}),
                         f"{T}teacher_run_ids": teacher.run_id, f"{T}cache_run_ids": cache.run_id})
        table = summary(steps)
        parent.client.log_text(parent.run_id, table + "\n", "summary.txt")
        print(table)
        return parent.run_id


def teacher_and_cache(cfg: Config, version: str, forced: set[str] = frozenset()) -> tuple[Step, Step]:
    """The teacher step and its cache step, each reused when finished unless its name is in `forced`."""
    teacher = run_step("teacher", cfg, TEACHER_KEYS, [], version, "teacher" in forced,
                       lambda: train_teacher.run(cfg))
    cache = run_step("cache", cfg, CACHE_KEYS, [teacher.run_id], version, "cache" in forced,
                     lambda: cache_logits.run(cfg, teacher.run_id, force="cache" in forced))
    return teacher, cache


def student_config(cfg: Config, method: str) -> Config:
    """The config of one student: feature methods read the teacher's features, so they run it online."""
    mode = "online" if method in FEATURE_METHODS else cfg.teacher_mode
    return config.override(cfg, [f"method={method}", f"teacher_mode={mode}"])


def run_step(name: str, cfg: Config, keys: tuple[str, ...], upstream: list[str], version: str, force: bool,
             launch: Callable[[], str]) -> Step:
    """Reuse the newest FINISHED run with this step key, else launch the step and tag its run with the key."""
    key = step_key(name.split("-")[0], cfg, keys, upstream, version)
    if not force:
        for done in tracking.find_runs({f"{T}step_key": key}):
            print(f"{name}: reusing run {done.info.run_id}", file=sys.stderr)
            return Step(name, done.info.run_id, True)
    run_id = launch()
    tracking.StageRun.of(run_id).set_tags({f"{T}step_key": key})
    return Step(name, run_id, False)


def step_key(entry: str, cfg: Config, keys: tuple[str, ...], upstream: list[str], version: str) -> str:
    """sha256 of the entry point, the config values it depends on (typed, so 1 and "1" differ), the upstream
    run ids and the code version."""
    resolved = config.to_dict(cfg)
    chosen = {k: resolved[k] for k in keys}
    if entry == "teacher":
        chosen["data"] = {k: v for k, v in chosen["data"].items() if k != "student_labels"}  # students only
    if entry == "student" and cfg.method == "none":
        chosen = {k: v for k, v in chosen.items() if k not in ("kd", "teacher_mode")}  # a baseline distils nothing
    blob = json.dumps({"entry": entry, "config": chosen, "upstream": upstream, "code": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def summary(steps: list[Step]) -> str:
    """Teacher accuracy, each student's accuracy with and without KD, cache build time, epoch times, run ids."""
    rows = [("step", "run", "reused", "test acc", "agreement", "epoch s", "build s")]
    for step in steps:
        run = tracking.get_run(step.run_id)
        m = run.data.metrics
        epoch = _mean_history(step.run_id, "epoch_seconds") if step.name != "cache" else None
        rows.append((run.info.run_name, step.run_id, "yes" if step.reused else "no", _fmt(m.get("test/acc")),
                     _fmt(m.get("test/agreement")), _fmt(epoch, 3), _fmt(m.get("build/seconds"), 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _mean_history(run_id: str, key: str) -> float | None:
    values = [m.value for m in tracking.configure().get_metric_history(run_id, key)]
    return sum(values) / len(values) if values else None


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
