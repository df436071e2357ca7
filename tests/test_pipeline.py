"""pipeline, sweep and fetch end to end on the session store, with a tiny config."""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def first_pipeline(store: str) -> str:
    code, out, err = _pipeline("pipeline")
    assert code == 0, err
    return out.strip().splitlines()[-1]


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
    text = Path(summary).read_text()
    for name, (run_id, _) in steps.items():
        assert run_id in text, name


def test_second_invocation_reuses_every_step(first_pipeline: str):
    code, out, err = _pipeline("pipeline")
    assert code == 0, err
    again = _steps(out.strip().splitlines()[-1])
    assert {k: v[0] for k, v in again.items()} == {k: v[0] for k, v in _steps(first_pipeline).items()}
    assert all(reused for _, reused in again.values())


def test_student_change_reruns_only_that_student(first_pipeline: str):
    code, out, err = _pipeline("pipeline", "--set", "kd.temperature=2")
    assert code == 0, err
    steps, before = _steps(out.strip().splitlines()[-1]), _steps(first_pipeline)
    assert steps["teacher"] == [before["teacher"][0], True] and steps["cache"] == [before["cache"][0], True]
    assert steps["student-none"] == [before["student-none"][0], True]
    assert steps["student-kd"][1] is False and steps["student-kd"][0] != before["student-kd"][0]


def test_teacher_change_reruns_everything(first_pipeline: str):
    code, out, err = _pipeline("pipeline", "--set", "optim.lr=0.04")
    assert code == 0, err
    steps, before = _steps(out.strip().splitlines()[-1]), _steps(first_pipeline)
    for name in ("teacher", "cache", "student-kd"):
        assert steps[name][1] is False and steps[name][0] != before[name][0], name
    # The baseline learns from labels alone: another teacher does not make it another run.
    assert steps["student-none"] == [before["student-none"][0], True]


def test_force_reruns_from_that_step(first_pipeline: str):
    code, out, err = _pipeline("pipeline", "--force", "cache")
    assert code == 0, err
    steps, before = _steps(out.strip().splitlines()[-1]), _steps(first_pipeline)
    assert steps["teacher"] == [before["teacher"][0], True]
    assert all(not steps[n][1] for n in ("cache", "student-kd", "student-none"))


def test_sweep_skips_finished_and_reruns_failed(store: str, monkeypatch: pytest.MonkeyPatch):
    args = ["sweep", "--config", str(DIGITS), "--grid", "kd.alpha=0.5,0.9", "--seeds", "0,1",
            *[a for s in (*TINY, "experiment=sweep") for a in ("--set", s)]]
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
    assert "kd.alpha=0.5" in out and " 2 " in out.splitlines()[1]
    parent = out.strip().splitlines()[-1]
    csv_text = Path(tracking.artifact_path(parent, "results.csv")).read_text().splitlines()
    assert csv_text[0].startswith("combination,seeds,val/acc mean,val/acc std,best/val_acc mean")
    assert len(csv_text) == 3
    code, out, err = cli(*args, "--force-restart")
    assert code == 0 and err.count("reusing run") == 2  # only teacher and cache


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


def test_ui_fields_are_stable(first_pipeline: str):
    client = MlflowClient()
    steps = _steps(first_pipeline)
    teacher, kd = client.get_run(steps["teacher"][0]), client.get_run(steps["student-kd"][0])
    assert teacher.info.run_name == "teacher-mlp-digits"
    assert client.get_run(steps["cache"][0]).info.run_name == "cache-teacher-mlp-digits"
    for run in (teacher, kd):
        assert run.data.tags["mlflow.note.content"]
        assert {"kd.alpha", "kd.temperature", "student.model.name", "optim.lr", "seed"} <= set(run.data.params)
        assert run.inputs.dataset_inputs
    assert set(teacher.data.params) == set(kd.data.params)  # same columns in the compare view
    assert config.flatten(config.load(DIGITS)).keys() == teacher.data.params.keys()
