"""A grid of student runs under one parent: finished combinations are skipped, failed ones rerun; a results
table (mean ± std over seeds) is printed and logged as `results.csv`."""
from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
import sys

from kdtrack import config, output, teachers, tracking
from kdtrack.config import Config
from kdtrack.errors import BadInput, KdtrackError, TrainingError
from kdtrack.stages import train_student
from kdtrack.stages.pipeline import (FEATURE_METHODS, given_teachers_and_caches, save_students_view, student_step,
                                     teacher_and_cache)

T = tracking.TAG
# Papers differ on which accuracy they report, so both are kept: the last epoch's and the best epoch's.
COLUMNS = ("val/acc", "best/val_acc", "test/acc")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["method=kd,none", "kd.alpha=0.5,0.9"]` -> {"method": ["kd", "none"], "kd.alpha": ["0.5", "0.9"]}."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise BadInput(f"--grid {item!r} is not of the form key=v1,v2,...", "e.g. --grid kd.alpha=0.5,0.75")
        grid[key] = values.split(",")
    return grid


def run(cfg: Config, grid: dict[str, list[str]], seeds: list[int], *, force_restart: bool,
        teacher_run_ids: list[str] = ()) -> str:
    """Every combination of `grid` and `seeds` as a student run of the config's teacher and cache (both reused
    when finished), or of the teacher runs given (fused when several) and their caches; FINISHED combinations are
    skipped unless `force_restart`. Returns the parent run id."""
    if not seeds:
        raise BadInput("no seeds given", "pass at least one seed, e.g. --seeds 0")
    for teacher_run_id in teacher_run_ids:
        teachers.teacher_run(teacher_run_id)  # before the sweep's run starts
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    configs = [(combo, seed, _combo_config(cfg, combo, seed)) for combo in combos for seed in seeds]
    version = tracking.code_version()
    params = {**{k: v for k, v in config.flatten(cfg).items() if k not in grid and k != "seed"},
              **{f"grid.{k}": ",".join(v) for k, v in grid.items()}, "seeds": ",".join(map(str, seeds))}
    with tracking.stage_run("sweep", cfg, run_name=f"sweep-{cfg.experiment}", params=params,
                            description=f"{len(configs)} students: grid {grid}, seeds {seeds}.") as parent:
        if teacher_run_ids:
            given, caches = given_teachers_and_caches(cfg, list(teacher_run_ids), version)
        else:
            teacher, cache = teacher_and_cache(cfg, version)
            given, caches = [teacher], [cache]
        results, failed = [], []
        for combo, seed, student_cfg in configs:
            name = ", ".join(f"{k}={v}" for k, v in combo.items()) or "default"
            try:
                step = student_step(f"student-{name}-seed{seed}", student_cfg, given, caches, version,
                                    force_restart, run_name=student_name(student_cfg, combo, seed, len(seeds) > 1))
            except KdtrackError as exc:  # one bad combination must not stop the others
                print(f"sweep: {name} seed {seed} failed: {exc}", file=sys.stderr)
                failed.append(f"{name} seed {seed}")
                continue
            results.append((name, seed, step.run_id))
        if not results:
            raise TrainingError(f"all {len(configs)} sweep combinations failed", "see the errors above")
        table, rows = _table(results)
        parent.client.log_text(parent.run_id, _csv(rows), "results.csv")
        parent.set_tags({f"{T}teacher_run_ids": ",".join(t.run_id for t in given),
                         f"{T}cache_run_ids": ",".join(c.run_id for c in caches),
                         f"{T}student_run_ids": ",".join(dict.fromkeys(r for _, _, r in results))})
        tracking.set_description(parent.run_id, _describe(parent.run_id, len(configs), grid, seeds, results))
        save_students_view(cfg.experiment)
        output.result(table)
        if failed:
            raise TrainingError(f"{len(failed)} of {len(configs)} sweep runs failed ({'; '.join(failed)})",
                                "fix the cause and run the same sweep again: finished runs are skipped")
        return parent.run_id


# Shown by train_student.run_name already (or, for a baseline, not used by it).
_IN_BASE_NAME = ("method", "teacher_mode", "kd.alpha", "kd.temperature")


def student_name(cfg: Config, combo: dict[str, str], seed: int, several_seeds: bool) -> str:
    """A student's run name within a sweep: `train_student.run_name`, then each grid setting that name does not show,
    then the seed when the sweep has several (`student-kd-t4-a0.5-seed1`)."""
    extra = [f"{k}={v}" for k, v in combo.items()
             if k not in _IN_BASE_NAME and not (cfg.method == "none" and k.startswith("kd."))]
    return "-".join([train_student.run_name(cfg), *extra, *([f"seed{seed}"] if several_seeds else [])])


def _describe(parent_run_id: str, count: int, grid: dict[str, list[str]], seeds: list[int],
              results: list[tuple[str, int, str]]) -> str:
    """Markdown: the grid, and a link to every student results.csv averages, saying which belong to another run (a
    finished student reused from an earlier pipeline or sweep stays a child of that one)."""
    lines = [f"{count} students: grid {grid}, seeds {seeds}. Students averaged in results.csv:", ""]
    for name, seed, run_id in results:
        parent = tracking.get_run(run_id).data.tags.get("mlflow.parentRunId")
        elsewhere = f" (reused, a child of {tracking.run_link(parent)})" if parent and parent != parent_run_id else ""
        lines.append(f"- {name}, seed {seed}: {tracking.run_link(run_id)}{elsewhere}")
    return "\n".join(lines)


def _combo_config(cfg: Config, combo: dict[str, str], seed: int) -> Config:
    sets = [f"{k}={v}" for k, v in combo.items()] + [f"seed={seed}"]
    student_cfg = config.override(cfg, sets)
    if student_cfg.method in FEATURE_METHODS and "teacher_mode" not in combo:
        student_cfg = config.override(student_cfg, ["teacher_mode=online"])
    return student_cfg


def _table(results: list[tuple[str, int, str]]) -> tuple[str, list[dict]]:
    """Mean ± std over seeds per combination, and one CSV row per combination."""
    by_combo: dict[str, list[dict[str, float]]] = {}
    for name, _seed, run_id in results:
        by_combo.setdefault(name, []).append(tracking.get_run(run_id).data.metrics)
    rows, lines = [], [f"{'combination':40} {'n':>2}  " + "  ".join(f"{c:>17}" for c in COLUMNS)]
    for name, metrics in by_combo.items():
        row = {"combination": name, "seeds": len(metrics)}
        cells = []
        for column in COLUMNS:
            values = [m[column] for m in metrics if column in m and math.isfinite(m[column])]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{column} mean"], row[f"{column} std"] = mean, std
            # one value has no spread: `(n=1)`, not a misleading `± 0.0000`
            single = f"{mean:8.4f}{'(n=1)' if values else '':>9}"
            cells.append(f"{mean:8.4f} ± {std:6.4f}" if len(values) > 1 else single)
        rows.append(row)
        lines.append(f"{name:40} {len(metrics):2d}  " + "  ".join(cells))
    print(f"sweep: {len(results)} student runs", file=sys.stderr)
    return "\n".join(lines), rows


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
