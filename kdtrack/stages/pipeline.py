"""The whole chain under one parent run: teacher -> cache -> students, each step reused when nothing it depends
on changed (same entry point, same resolved config by value, same upstream runs, same code version)."""
from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdtrack import claims, config, mlflow_model, output, tracking
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


def run(cfg: Config, students: list[str], *, force: str | None = None, register: str | None = None) -> str:
    """Teacher, cache and one student per method in `students` as child runs of a `pipeline` run; reused steps
    are linked, not rerun. `force` reruns that step ("teacher", "cache" or "students") and all after it. `register`
    registers the MLflow model of the first student (of students[0]) under that name."""
    if force is not None and force not in STEPS:
        raise BadInput(f"--force {force!r} is not a step", f"choose one of: {', '.join(STEPS)}")
    forced = set(STEPS[STEPS.index(force):]) if force else set()
    version = tracking.code_version()
    if "-dirty" in version:
        print("note: the working tree has uncommitted changes; steps are reused only with these exact changes",
              file=sys.stderr)
    params = {**{k: v for k, v in config.flatten(cfg).items() if k != "method"}, "students": ",".join(students)}
    with tracking.stage_run("pipeline", cfg, run_name=f"pipeline-{cfg.experiment}", params=params,
                            description=f"Teacher, cache and students ({', '.join(students)}) of {cfg.experiment}.") \
            as parent:
        teacher, cache = teacher_and_cache(cfg, version, forced)
        steps = [teacher, cache]
        for method in students:
            steps.append(student_step(f"student-{method}", student_config(cfg, method), [teacher], [cache], version,
                                      "students" in forced))
        read = sorted({c for s in steps[2:] for c in _tag_ids(s.run_id, "cache_run_ids")})
        parent.set_tags({f"{T}steps": json.dumps({s.name: [s.run_id, s.reused] for s in steps}),
                         f"{T}teacher_run_ids": teacher.run_id, f"{T}cache_run_ids": ",".join(read) or cache.run_id})
        if register:
            registered = mlflow_model.register(steps[2].run_id, register)
            parent.set_tags({f"{T}registered_model": f"{register}/{registered}"})
        table = summary(steps)
        parent.client.log_text(parent.run_id, table + "\n", "summary.txt")
        tracking.set_description(parent.run_id, f"Teacher, cache and students ({', '.join(students)}) of "
                                 f"{cfg.experiment}:\n\n{step_list(steps)}")
        save_students_view(cfg.experiment)
        output.result(table)
        return parent.run_id


def teacher_and_cache(cfg: Config, version: str, forced: set[str] = frozenset()) -> tuple[Step, Step]:
    """The teacher step and its cache step, each reused when finished unless its name is in `forced`."""
    teacher = run_step("teacher", cfg, TEACHER_KEYS, [], version, "teacher" in forced,
                       lambda: train_teacher.run(cfg),
                       resume=lambda rid: train_teacher.run(_own_config(rid), resume_run_id=rid))
    return teacher, cache_step(cfg, teacher.run_id, version, "cache" in forced)


def given_teachers_and_caches(cfg: Config, teacher_run_ids: list[str], version: str) -> tuple[list[Step], list[Step]]:
    """Teacher runs trained earlier (by train-teacher, or another pipeline), each with its cache step."""
    teachers = [Step("teacher", run_id, True) for run_id in teacher_run_ids]
    return teachers, [cache_step(cfg, t.run_id, version, False) for t in teachers]


def cache_step(cfg: Config, teacher_run_id: str, version: str, force: bool) -> Step:
    return run_step("cache", cfg, CACHE_KEYS, [teacher_run_id], version, force,
                    lambda: cache_logits.run(cfg, teacher_run_id, force=force), valid=cache_logits.store_problem)


def student_step(name: str, cfg: Config, teachers: list[Step], caches: list[Step], version: str,
                 force: bool, run_name: str | None = None) -> Step:
    """One student of the teacher steps (fused when several) and their cache steps: a cached-KD student reads exactly
    those caches; a baseline (method none) depends on neither, so its step is shared by every teacher."""
    baseline = cfg.method == "none"
    teacher_ids = [] if baseline else [t.run_id for t in teachers]
    read = [c.run_id for c in caches] if cfg.method == "kd" and cfg.teacher_mode == "cached" else []
    upstream = [] if baseline else [*teacher_ids, *(c.run_id for c in caches)]
    return run_step(name, cfg, STUDENT_KEYS, upstream, version, force,
                    lambda: train_student.run(cfg, teacher_ids, cache_run_ids=read, name=run_name),
                    resume=lambda rid: train_student.run(_own_config(rid), teacher_ids, resume_run_id=rid,
                                                         cache_run_ids=read))


def student_config(cfg: Config, method: str) -> Config:
    """The config of one student: feature methods read the teacher's features, so they run it online."""
    mode = "online" if method in FEATURE_METHODS else cfg.teacher_mode
    return config.override(cfg, [f"method={method}", f"teacher_mode={mode}"])


def run_step(name: str, cfg: Config, keys: tuple[str, ...], upstream: list[str], version: str, force: bool,
             launch: Callable[[], str], *, resume: Callable[[str], str] | None = None,
             valid: Callable[[Any], str | None] | None = None) -> Step:
    """Reuse the newest FINISHED run with this step key (that `valid` finds no problem with), else resume the newest
    KILLED one from its last checkpoint (`resume`), else launch the step. Equal step keys are claimed like cache
    builds, so two equal pipelines or sweeps at once do each step once: the second waits, then reuses."""
    entry = name.split("-")[0]
    key = step_key(entry, cfg, keys, upstream, version)
    with claims.claim(tracking.download_dir() / "claims", f"step-{key}", f"running step {name} ({key[:12]})"):
        if not force:
            for done in tracking.find_runs({f"{T}step_key": key}):
                problem = valid(done) if valid else None
                if problem is None:
                    print(f"{name}: reusing run {done.info.run_id}", file=sys.stderr)
                    return Step(name, done.info.run_id, True)
                print(f"{name}: not reusing run {done.info.run_id}: {problem}", file=sys.stderr)
            for stopped in tracking.find_runs({f"{T}step_key": key}, statuses=("KILLED",)) if resume else []:
                if "checkpoints/last.pt" in tracking.list_artifacts(stopped.info.run_id, "checkpoints"):
                    print(f"{name}: resuming interrupted run {stopped.info.run_id}", file=sys.stderr)
                    return Step(name, resume(stopped.info.run_id), False)
        with tracking.tagging(STAGE_OF_ENTRY[entry], {f"{T}step_key": key}):  # from the run's first write on
            run_id = launch()
        tracking.StageRun.of(run_id).set_tags({f"{T}step_key": key})  # also a reused cache run, found by its key
        return Step(name, run_id, False)


STAGE_OF_ENTRY = {"teacher": train_teacher.STAGE, "cache": cache_logits.STAGE, "student": train_student.STAGE}


def step_list(steps: list[Step]) -> str:
    """A markdown list linking each step's run, saying which were reused from earlier runs."""
    return "\n".join(f"- {s.name}: {tracking.run_link(s.run_id)}{' (reused)' if s.reused else ''}" for s in steps)


# The demo's first view: the students of an experiment with the columns that tell them apart.
STUDENTS_VIEW = "kdtrack-students"
VIEW_PARAMS = ["method", "kd.alpha", "kd.temperature", "seed", "data.train_rows", "data.labelled_rows"]
VIEW_METRICS = ["test/acc", "test/agreement", "best/val_acc"]


def save_students_view(experiment: str) -> None:
    """Save the students view of `experiment` (opened by `tracking.runs_view_url(experiment, STUDENTS_VIEW)`)."""
    tracking.save_runs_view(experiment, STUDENTS_VIEW, "kdtrack students",
                            search_filter=f"tags.`{T}stage` = 'student'", params=VIEW_PARAMS, metrics=VIEW_METRICS,
                            group_by_param="method")
    print(f"students table: {tracking.runs_view_url(experiment, STUDENTS_VIEW)}", file=sys.stderr)


def _own_config(run_id: str) -> Config:
    return tracking.load_run_config(run_id, Config)


def _tag_ids(run_id: str, tag: str) -> list[str]:
    return [r for r in tracking.get_run(run_id).data.tags.get(f"{T}{tag}", "").split(",") if r]


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
    rows = [("step", "run", "reused", "test acc", "agreement", "epoch s", "build s", "read from")]
    for step in steps:
        run = tracking.get_run(step.run_id)
        m = run.data.metrics
        epoch = _mean_history(step.run_id, "epoch_seconds") if step.name != "cache" else None
        rows.append((run.info.run_name, step.run_id, "yes" if step.reused else "no", _fmt(m.get("test/acc")),
                     _fmt(m.get("test/agreement")), _fmt(epoch, 3), _fmt(m.get("build/seconds"), 2),
                     _read_from(run.data.tags)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _read_from(tags: dict[str, str]) -> str:
    """The runs a step's run read, from its own tags: caches for cached KD, else teachers; `labels` for a baseline."""
    for tag, what in (("cache_run_ids", "cache"), ("teacher_run_id", "teacher"), ("teacher_run_ids", "teacher")):
        if tags.get(f"{T}{tag}"):
            return f"{what} {tags[f'{T}{tag}']}"
    return "labels" if tags.get(f"{T}stage") == "student" else "-"


def _mean_history(run_id: str, key: str) -> float | None:
    values = [m.value for m in tracking.configure().get_metric_history(run_id, key)]
    return sum(values) / len(values) if values else None


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
