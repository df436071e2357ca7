"""pipeline, sweep and fetch end to end on the session store, with a tiny config."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, cli
from kdtrack import checkpoint, config, tracking
from kdtrack.cache import LogitTable
from kdtrack.stages import train_student

TINY = (*TINY_TEACHER, "student.model.hidden=[8]", "student.optim.epochs=2", "cache.chunk_rows=512")


def _pipeline(experiment: str, *extra: str) -> tuple[int, str, str]:
    sets = [a for s in (*TINY, f"experiment={experiment}") for a in ("--set", s)]
    return cli("pipeline", "--config", str(DIGITS), "--students", "kd,none", *sets, *extra)


def _steps(parent: str) -> dict[str, list]:
    return json.loads(MlflowClient().get_run(parent).data.tags["kdtrack.steps"])


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def first_pipeline(store: str) -> str:
    code, out, err = _pipeline("pipeline")
    assert code == 0, err
    return out.strip().splitlines()[-1]


@pytest.mark.slow  # the first_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_pipeline_runs_every_stage_as_finished_children(first_pipeline: str):
    client = MlflowClient()
    parent = client.get_run(first_pipeline)
    assert parent.info.status == "FINISHED" and parent.data.tags["kdtrack.stage"] == "pipeline"
    steps = _steps(first_pipeline)
    assert list(steps) == ["teacher", "cache", "student-kd", "student-none"]
    for name, (run_id, reused) in steps.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and reused is False, name
        assert run.data.tags["mlflow.parentRunId"] == first_pipeline, name
    teacher, cache = steps["teacher"][0], steps["cache"][0]
    assert client.get_run(cache).data.tags["kdtrack.teacher_run_id"] == teacher
    kd = client.get_run(steps["student-kd"][0])
    assert kd.data.tags["kdtrack.cache_run_ids"] == cache and kd.info.run_name == "student-kd-t4-a0.7"
    summary = client.download_artifacts(first_pipeline, "summary.txt", str(Path(client.get_run(first_pipeline)
                                                                                  .info.artifact_uri[7:]).parent))
    header, *rows = Path(summary).read_text().splitlines()
    assert header.split() == ["step", "run", "reused", "test", "acc", "agreement", "epoch", "s", "build", "s",
                              "read", "from"]
    read_from = {"teacher": "-", "cache": f"teacher {teacher}", "student-kd": f"cache {cache}",
                 "student-none": "labels"}
    # one row per step, in order, each read back from that step's own run
    assert [row.split()[:3] for row in rows] == [[client.get_run(run_id).info.run_name, run_id, "no"]
                                                 for run_id, _ in steps.values()]
    cells = {name: row.rstrip().split(maxsplit=7)[3:] for row, name in zip(rows, steps)}
    for name, (run_id, _) in steps.items():
        metrics = client.get_run(run_id).data.metrics
        times = [m.value for m in client.get_metric_history(run_id, "epoch_seconds")]
        assert cells[name] == [_fmt(metrics.get("test/acc")), _fmt(metrics.get("test/agreement")),
                               _fmt(sum(times) / len(times) if times and name != "cache" else None, 3),
                               _fmt(metrics.get("build/seconds"), 2), read_from[name]], name
    # so the table is not all dashes: the KD student has both figures, the cache its build time
    assert "-" not in cells["student-kd"][:3] and cells["cache"][3] != "-"


@pytest.mark.slow  # the first_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_second_invocation_reuses_every_step(first_pipeline: str):
    code, out, err = _pipeline("pipeline")
    assert code == 0, err
    again = _steps(out.strip().splitlines()[-1])
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in _steps(first_pipeline).items()}
    assert all(reused for _, reused in again.values())


@pytest.mark.slow  # the first_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_student_change_reruns_only_that_student(first_pipeline: str):
    code, out, err = _pipeline("pipeline", "--set", "kd.temperature=2")
    assert code == 0, err
    steps, before = _steps(out.strip().splitlines()[-1]), _steps(first_pipeline)
    assert steps["teacher"] == [before["teacher"][0], True] and steps["cache"] == [before["cache"][0], True]
    assert steps["student-none"] == [before["student-none"][0], True]
    assert steps["student-kd"][1] is False and steps["student-kd"][0] != before["student-kd"][0]


@pytest.mark.slow  # a second whole pipeline: teacher, cache and students (~1 s)
def test_teacher_change_reruns_everything(first_pipeline: str):
    code, out, err = _pipeline("pipeline", "--set", "optim.lr=0.04")
    assert code == 0, err
    steps, before = _steps(out.strip().splitlines()[-1]), _steps(first_pipeline)
    for name in ("teacher", "cache", "student-kd"):
        assert steps[name][1] is False and steps[name][0] != before[name][0], name
    # The baseline learns from labels alone: another teacher does not make it another run.
    assert steps["student-none"] == [before["student-none"][0], True]


@pytest.mark.slow  # reruns a cache and its students (~1 s)
def test_force_reruns_from_that_step(first_pipeline: str):
    code, out, err = _pipeline("pipeline", "--force", "cache")
    assert code == 0, err
    steps, before = _steps(out.strip().splitlines()[-1]), _steps(first_pipeline)
    assert steps["teacher"] == [before["teacher"][0], True]
    for name in ("cache", "student-kd", "student-none"):  # new runs, not the old ones relabelled
        assert steps[name][1] is False and steps[name][0] != before[name][0], name
        assert MlflowClient().get_run(steps[name][0]).info.status == "FINISHED", name


@pytest.mark.slow  # a sweep of student trainings, then its rerun (~4 s on 2 cores)
def test_sweep_skips_finished_and_reruns_failed(store: str, monkeypatch: pytest.MonkeyPatch):
    args = ["sweep", "--config", str(DIGITS), "--grid", "kd.alpha=0.5,0.9", "--seeds", "0,1",
            *[a for s in (*TINY, "model.hidden=[28]", "experiment=sweep") for a in ("--set", s)]]
    original = train_student.run

    def fail_alpha_09(cfg, teachers, **kwargs):
        if cfg.kd.alpha == 0.9 and cfg.seed == 1:
            from kdtrack.errors import TrainingError

            raise TrainingError("injected failure", "rerun")
        return original(cfg, teachers, **kwargs)

    monkeypatch.setattr(train_student, "run", fail_alpha_09)
    code, out, err = cli(*args)
    assert code == 1 and "1 of 4 sweep runs failed (kd.alpha=0.9 seed 1)" in err
    monkeypatch.setattr(train_student, "run", original)
    code, out, err = cli(*args)
    assert code == 0, err
    assert err.count("reusing run") == 2 + 3  # teacher, cache and the three students that finished
    parent = out.strip().splitlines()[-1]
    with open(tracking.artifact_path(parent, "results.csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    # mean and sample std over the two seeds, from the student runs themselves
    client = MlflowClient()
    students = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                  "tags.`kdtrack.stage` = 'student' and attributes.status = 'FINISHED'")
    by_alpha: dict[str, dict[str, dict[str, float]]] = {}
    for run in students:
        by_alpha.setdefault(run.data.params["kd.alpha"], {})[run.data.params["seed"]] = run.data.metrics
    assert {alpha: sorted(seeds) for alpha, seeds in by_alpha.items()} == {"0.5": ["0", "1"], "0.9": ["0", "1"]}
    assert [row["combination"] for row in table] == ["kd.alpha=0.5", "kd.alpha=0.9"]
    for row in table:
        metrics = by_alpha[row["combination"].split("=")[1]].values()
        assert row["seeds"] == "2", row
        for column in ("val/acc", "best/val_acc", "test/acc"):
            values = np.array([m[column] for m in metrics])
            assert float(row[f"{column} mean"]) == pytest.approx(values.mean(), rel=1e-12), (row, column)
            std = values.std(ddof=1)
            assert float(row[f"{column} std"]) == pytest.approx(std, rel=1e-9, abs=1e-15), (row, column)
    # the printed table: one line per combination, with its seed count
    assert [line.split()[:2] for line in out.splitlines()[1:3]] == [["kd.alpha=0.5", "2"], ["kd.alpha=0.9", "2"]]
    code, out, err = cli(*args, "--force-restart")
    assert code == 0 and err.count("reusing run") == 2  # only teacher and cache


@pytest.mark.slow  # the first_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_fetch_gives_loadable_checkpoints_and_cache(first_pipeline: str, tmp_path: Path):
    steps = _steps(first_pipeline)
    code, out, _ = cli("fetch", "--run-id", steps["teacher"][0], "--out", str(tmp_path))
    assert code == 0
    folder = Path(out.strip())
    payload = checkpoint.load(folder / "best.pt")
    tags = MlflowClient().get_run(steps["teacher"][0]).data.tags
    assert payload["weights_sha256"] == tags["kdtrack.checkpoint_sha256"]
    code, out, _ = cli("fetch", "--run-id", steps["cache"][0], "--out", str(tmp_path))
    assert code == 0
    fetched = LogitTable.open(out.strip())
    original = LogitTable.open(tracking.artifact_path(steps["cache"][0], "logits.zarr"))
    rows = np.arange(len(original))
    assert torch.equal(fetched[rows], original[rows])
    code, _out, err = cli("fetch", "--run-id", first_pipeline, "--out", str(tmp_path))
    assert code == 2 and "is a pipeline run with nothing to fetch" in err


def test_unknown_student_method_is_refused_before_any_run(store: str):
    code, _out, err = cli("pipeline", "--config", str(DIGITS), "--students", "kd,distil",
                           "--set", "experiment=never-run")
    assert code == 2 and "method='distil' is not allowed" in err
    assert MlflowClient().get_experiment_by_name("never-run") is None


@pytest.mark.slow  # the first_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_ui_fields_are_stable(first_pipeline: str):
    client = MlflowClient()
    steps = _steps(first_pipeline)
    teacher, kd = client.get_run(steps["teacher"][0]), client.get_run(steps["student-kd"][0])
    assert teacher.info.run_name == "teacher-mlp-digits"
    assert client.get_run(steps["cache"][0]).info.run_name == "cache-teacher-mlp-digits"
    assert teacher.data.tags["mlflow.note.content"].startswith("Teacher mlp on digits (")
    assert kd.data.tags["mlflow.note.content"].startswith(
        "Student mlp by kd from the cached logits of teacher [teacher-mlp-digits](#/experiments/")
    assert {"kd.alpha", "kd.temperature", "student.model.name", "student.optim.lr", "seed"} <= set(kd.data.params)
    assert {"model.name", "optim.lr", "seed"} <= set(teacher.data.params)
    for run, rows in ((teacher, "digits/train+val+test"), (kd, "digits/train")):  # all labels: no transfer set
        inputs = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                  for i in run.inputs.dataset_inputs}
        digest, context = inputs.pop(rows)  # the training rows, named by their view of the data
        assert context == "train" and len(digest) >= 12
        assert run.data.tags["kdtrack.dataset_digest"].startswith(digest)
        # the KD student also lists the teacher's logit cache it read
        assert [c for _, c in inputs.values()] == ([] if run is teacher else ["teacher_logits"])
    # the whole resolved config stays in config.yaml, whatever subset each run logs as params
    assert config.to_dict(tracking.load_run_config(teacher.info.run_id, config.Config)) == config.to_dict(
        config.load(DIGITS, [*TINY, "experiment=pipeline"]))
