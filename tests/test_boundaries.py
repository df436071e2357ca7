"""Every boundary checks content, not tags: resumed and adopted runs, checkpoints, reused caches, deleted runs.

Each test here failed before the check it names existed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import DIGITS, TINY_TEACHER, cli, interrupted_after_epoch, set_args, subprocess_env
from mlflow.tracking import MlflowClient

from kdtrack import checkpoint, config, tracking
from kdtrack.errors import RunNotFound
from kdtrack.stages import cache_logits, train_student, train_teacher

STUDENT = ("student.model.name=mlp", "student.model.hidden=[16]", "student.optim.epochs=2", "train.progress=off")


def _teacher(*sets: str) -> str:
    return train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "experiment=boundaries", *sets]))


def _snapshot(run_id: str) -> tuple:
    """Everything a wrong write would change: status, end time, tags, params, metric keys."""
    run = MlflowClient().get_run(run_id)
    return run.info.status, run.info.end_time, dict(run.data.tags), dict(run.data.params), sorted(run.data.metrics)


def _artifact(run_id: str, path: str) -> Path:
    return tracking.local_artifact_dir(run_id) / path


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def chain(digits_teacher: str) -> dict[str, str]:
    """A finished teacher, cache and KD student."""
    cfg = config.load(DIGITS, [*STUDENT, "experiment=boundaries"])
    cache = cache_logits.run(cfg, digits_teacher)
    return {"teacher": digits_teacher, "cache": cache, "student": train_student.run(cfg, [digits_teacher])}


# ------------------------------------------------------------------------------------ runs written to: resume, adopt

@pytest.mark.parametrize("command, target, message", [
    ("train-teacher", "student", "is a student run, not a teacher run"),
    ("train-teacher", "cache", "is a cache run, not a teacher run"),
    ("train-teacher", "teacher", "is FINISHED; a finished run is never reopened"),
    ("train-student", "teacher", "is a teacher run, not a student run"),
    ("train-student", "student", "is FINISHED; a finished run is never reopened"),
])
def test_resume_of_a_wrong_or_finished_run_writes_nothing(chain: dict[str, str], command: str, target: str,
                                                          message: str):
    run_id = chain[target]
    before = _snapshot(run_id)
    code, out, err = cli(command, "--resume", run_id)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert _snapshot(run_id) == before


@pytest.mark.slow  # trains a student, then a cache-logits that reuses a cache (~1 s on 2 cores)
def test_a_stale_mlflow_run_id_is_never_adopted(chain: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    before = _snapshot(chain["teacher"])
    monkeypatch.setenv("MLFLOW_RUN_ID", chain["teacher"])
    code, out, err = cli("train-student", "--config", str(DIGITS), "--teacher-run-id", chain["teacher"],
                         *set_args(*STUDENT, "experiment=boundaries"))
    assert code == 0, err
    assert f"ignoring MLFLOW_RUN_ID={chain['teacher']}" in err
    assert out.strip() != chain["teacher"]
    assert MlflowClient().get_run(out.strip()).data.tags["kdtrack.stage"] == "student"
    monkeypatch.setenv("MLFLOW_RUN_ID", chain["teacher"])  # a reused cache notes itself only on its own launcher
    code, out, err = cli("cache-logits", "--teacher-run-id", chain["teacher"], "--config", str(DIGITS),
                         *set_args(*STUDENT, "experiment=boundaries"))
    assert code == 0 and f"reusing cache run {out.strip()}" in err, err
    reused, built = (MlflowClient().get_run(r) for r in (out.strip(), chain["cache"]))  # any finished cache of the key
    assert reused.info.status == "FINISHED"
    assert reused.data.tags["kdtrack.cache_key"] == built.data.tags["kdtrack.cache_key"]
    assert _snapshot(chain["teacher"]) == before


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_resume_with_another_config_or_teacher_is_refused(store: str):
    teacher = _teacher()
    other = _teacher("seed=1")
    cfg = config.load(DIGITS, [*STUDENT, "experiment=boundaries", "student.optim.epochs=3"])
    cache_logits.run(cfg, teacher)
    cache_logits.run(cfg, other)
    with interrupted_after_epoch(0), pytest.raises(KeyboardInterrupt):
        train_student.run(cfg, [teacher])
    (killed,) = tracking.find_runs({"kdtrack.teacher_run_ids": teacher, "kdtrack.stage": "student"},
                                   statuses=("KILLED",))
    run_id = killed.info.run_id
    before = _snapshot(run_id)
    from kdtrack.errors import BadInput

    with pytest.raises(BadInput, match=r"kdtrack.teacher_run_ids=.* but this command has"):
        train_student.run(cfg, [other], resume_run_id=run_id)
    lr = config.override(cfg, ["student.optim.lr=0.5"])
    with pytest.raises(BadInput, match=r"was started with another config \(student.optim.lr: 0.05 -> 0.5\)"):
        train_student.run(lr, [teacher], resume_run_id=run_id)
    assert _snapshot(run_id) == before
    assert cli("train-student", "--resume", run_id)[0] == 0  # its own config and teachers: resumes
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------------- checkpoints

def test_a_swapped_teacher_checkpoint_is_refused_everywhere(digits_teacher: str, tmp_path: Path):
    # the session's teacher (another seed, so other weights) lends its file and is only read
    teacher, foreign = _teacher("seed=2"), digits_teacher
    recorded = MlflowClient().get_run(teacher).data.tags["kdtrack.checkpoint_sha256"]
    shutil.copyfile(_artifact(foreign, "checkpoints/best.pt"), _artifact(teacher, "checkpoints/best.pt"))
    swapped = checkpoint.load(_artifact(foreign, "checkpoints/best.pt"))["weights_sha256"]
    assert swapped != recorded
    expected = f"checkpoint best.pt of run {teacher} has weights {swapped[:12]} but the run recorded {recorded[:12]}"
    sets = set_args(*STUDENT, "experiment=boundaries")
    for args in (["cache-logits", "--teacher-run-id", teacher, "--config", str(DIGITS), *sets],
                 ["train-student", "--teacher-run-id", teacher, "--config", str(DIGITS), *sets,
                  "--set", "teacher_mode=online"],
                 ["recompute-logits", "--teacher-run-id", teacher, "--config", str(DIGITS), "--splits", "test"],
                 ["fetch", "--run-id", teacher, "--out", str(tmp_path)]):
        code, _out, err = cli(*args)
        assert code == 1 and expected in err, (args[0], err)
    assert not tracking.find_runs({"kdtrack.teacher_run_id": teacher},
                                  statuses=("RUNNING", "FINISHED", "FAILED", "KILLED"))  # no cache run started


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_a_foreign_last_pt_is_not_resumed(store: str):
    teacher = _teacher()
    cfg = config.load(DIGITS, [*STUDENT, "experiment=boundaries-foreign", "student.optim.epochs=3"])
    cache_logits.run(cfg, teacher)
    foreign = train_student.run(config.override(cfg, ["seed=7"]), [teacher])
    with interrupted_after_epoch(0), pytest.raises(KeyboardInterrupt):
        train_student.run(cfg, [teacher])
    (killed,) = tracking.find_runs({"kdtrack.teacher_run_ids": teacher, "kdtrack.stage": "student"},
                                   statuses=("KILLED",))
    run_id = killed.info.run_id
    shutil.copyfile(_artifact(foreign, "checkpoints/last.pt"), _artifact(run_id, "checkpoints/last.pt"))
    code, _out, err = cli("train-student", "--resume", run_id)
    assert code == 1 and f"checkpoint last.pt of run {run_id} has weights" in err, err
    assert MlflowClient().get_run(run_id).info.status == "KILLED"


# ------------------------------------------------------------------------------------------ data behind a digest

def _manifest(root: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        np.save(root / f"s{i:03d}.npy", (rng.normal(size=8) + i % 3).astype(np.float32))
        entries.append({"file": f"s{i:03d}.npy", "label": i % 3, "split": "train" if i % 4 else "val"})
    path = root / "manifest.json"
    path.write_text(json.dumps({"num_classes": 3, "samples": entries}))
    return path


@pytest.mark.parametrize("stage", ["teacher", "student"])
def test_resume_after_the_data_changed_is_refused_naming_both_digests(tmp_path: Path, stage: str):
    manifest = _manifest(tmp_path)
    sets = [*TINY_TEACHER, *STUDENT, "data.source=manifest", f"data.manifest={manifest}", "optim.epochs=3",
            "student.optim.epochs=3", "method=none", f"experiment=boundaries-data-{stage}"]
    cfg = config.load(None, sets)
    with interrupted_after_epoch(0), pytest.raises(KeyboardInterrupt):
        train_teacher.run(cfg) if stage == "teacher" else train_student.run(cfg)
    (killed,) = [r for r in tracking.select_runs(f"boundaries-data-{stage}", stage=stage) if r.info.status == "KILLED"]
    before = _snapshot(killed.info.run_id)
    old = before[2]["kdtrack.dataset_digest"]
    sample = tmp_path / "s001.npy"
    np.save(sample, np.load(sample) + 1.0)  # edited in place: same name, other content
    code, _out, err = cli(f"train-{stage}", "--resume", killed.info.run_id)
    assert code == 2 and f"kdtrack.dataset_digest={old[:12]} but this command has " in err, err
    assert "the data changed since the run started" in err
    assert _snapshot(killed.info.run_id) == before


# ------------------------------------------------------------------------------------------------ reused caches

@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_reuse_opens_the_store_and_rebuilds_a_broken_one(store: str):
    teacher = _teacher()
    cfg = config.load(DIGITS, [*STUDENT, "experiment=boundaries-reuse"])
    first = cache_logits.run(cfg, teacher)
    shutil.rmtree(_artifact(first, "logits.zarr"))  # the artifact is gone; the run's tags still say complete
    code, out, err = cli("cache-logits", "--teacher-run-id", teacher, "--config", str(DIGITS),
                         *set_args(*STUDENT, "experiment=boundaries-reuse"))
    second = out.strip()
    assert code == 0 and second != first, err
    assert f"not reusing cache run {first}: the store of cache run {first} cannot be opened" in err
    assert MlflowClient().get_run(first).data.tags["kdtrack.complete"] == "false"
    # The store itself says incomplete (its tag still says complete): not read, not reused.
    group = zarr.open_group(str(_artifact(second, "logits.zarr")), mode="r+")
    group.attrs["complete"] = False
    code, out, err = cli("train-student", "--teacher-run-id", teacher, "--config", str(DIGITS),
                         *set_args(*STUDENT, "experiment=boundaries-reuse"))
    assert code == 2 and f"not reusing cache run {second}: the store of cache run {second} is not marked complete" \
        in err, err
    assert "kdtrack cache-logits --teacher-run-id" in err  # ... and that command now works:
    third = cache_logits.run(cfg, teacher)
    assert third not in (first, second)
    code, out, err = cli("train-student", "--teacher-run-id", teacher, "--config", str(DIGITS),
                         *set_args(*STUDENT, "experiment=boundaries-reuse"))
    assert code == 0 and MlflowClient().get_run(out.strip()).data.tags["kdtrack.cache_run_ids"] == third, err


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_a_student_reads_only_a_cache_of_its_own_dtype(store: str):
    teacher = _teacher()
    cfg = config.load(DIGITS, [*STUDENT, "experiment=boundaries-dtype"])
    c32 = cache_logits.run(cfg, teacher)
    c16 = cache_logits.run(config.override(cfg, ["cache.dtype=float16"]), teacher)  # newer
    for dtype, expected in (("float32", c32), ("float16", c16)):
        run_id = train_student.run(config.override(cfg, [f"cache.dtype={dtype}"]), [teacher])
        assert MlflowClient().get_run(run_id).data.tags["kdtrack.cache_run_ids"] == expected, dtype


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_pipeline_records_the_caches_its_students_read(store: str):
    sets = set_args(*TINY_TEACHER, *STUDENT, "model.hidden=[40]", "experiment=boundaries-pipeline")  # its own steps
    code, out, err = cli("pipeline", "--config", str(DIGITS), "--students", "kd,none", *sets)
    assert code == 0, err
    first = json.loads(MlflowClient().get_run(out.strip().splitlines()[-1]).data.tags["kdtrack.steps"])
    shutil.rmtree(_artifact(first["cache"][0], "logits.zarr"))
    code, out, err = cli("pipeline", "--config", str(DIGITS), "--students", "kd,none", *sets)
    assert code == 0, err
    parent = MlflowClient().get_run(out.strip().splitlines()[-1])
    steps = json.loads(parent.data.tags["kdtrack.steps"])
    assert steps["teacher"] == [first["teacher"][0], True] and steps["cache"][0] != first["cache"][0]
    read = MlflowClient().get_run(steps["student-kd"][0]).data.tags["kdtrack.cache_run_ids"]
    assert read == steps["cache"][0] == parent.data.tags["kdtrack.cache_run_ids"]
    assert f"cache {read}" in out  # the summary's "read from" column


# ------------------------------------------------------------------------------------------ deleted and gone runs

@pytest.mark.slow  # `mlflow gc` as a process
def test_a_deleted_teacher_is_refused_and_lineage_marks_a_collected_link(store: str):
    teacher = _teacher()
    cfg = config.load(DIGITS, [*STUDENT, "experiment=boundaries-deleted"])
    cache = cache_logits.run(cfg, teacher)
    student = train_student.run(cfg, [teacher])
    MlflowClient().delete_run(teacher)
    code, _out, err = cli("cache-logits", "--teacher-run-id", teacher, "--config", str(DIGITS), "--force")
    assert code == 2 and f"teacher run {teacher} (teacher-mlp-digits) is deleted" in err, err
    assert "mlflow runs restore" in err
    code, out, _err = cli("lineage", student)
    assert code == 0 and "(FINISHED, DELETED)" in out.splitlines()[2]
    MlflowClient().delete_run(cache)
    gc = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", store, "--run-ids",
                         f"{cache},{teacher}"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr[-2000:]
    code, out, err = cli("lineage", student)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2, out + err
    assert lines[0].startswith("student-") and lines[1].startswith(f"  <- MISSING run {cache}: not in ")


# ------------------------------------------------------------------------------------------------ the baseline

@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_the_baseline_is_a_function_of_its_own_config_and_data(store: str):
    """Teachers trained on other splits normalise differently; a baseline names one or none and is the same."""
    cfg = config.load(DIGITS, [*STUDENT, "method=none", "experiment=boundaries-baseline"])
    weights = []
    for teachers in ([], [_teacher("data.seed=3")], [_teacher("data.seed=4")]):
        run_id = train_student.run(cfg, teachers)
        weights.append(MlflowClient().get_run(run_id).data.tags["kdtrack.checkpoint_sha256_last"])
        assert MlflowClient().get_run(run_id).data.tags["kdtrack.teacher_run_ids"] == ""
    assert weights[0] == weights[1] == weights[2]


def test_a_store_failure_mid_run_is_one_line_and_the_run_ends_failed(store: str, monkeypatch: pytest.MonkeyPatch):
    import sqlalchemy.exc

    def locked(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, Exception("database is locked"))

    monkeypatch.setattr(tracking.StageRun, "log_metrics", locked)
    code, _out, err = cli("train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER, "experiment=locked"))
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: tracking store {store} is locked by another process (database is "
                                    "locked) — retry once the other process has finished writing to it")
    (run,) = tracking.select_runs("locked")
    assert run.info.status == "FAILED"


@pytest.mark.slow  # opens a second tracking store (its tables are created: ~2 s)
def test_a_run_is_looked_up_in_the_store_of_the_moment(digits_teacher: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """Where a run's artifacts are is read once per store and run: another store does not know the run, and says so,
    rather than being served the first store's artifacts."""
    assert "checkpoints/best.pt" in tracking.list_artifacts(digits_teacher, "checkpoints")
    assert (tracking.local_artifact_dir(digits_teacher) / "checkpoints" / "best.pt").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(RunNotFound, match=f"^run {digits_teacher} not found in sqlite:///{tmp_path}"):
        tracking.list_artifacts(digits_teacher, "checkpoints")
    with pytest.raises(RunNotFound, match=f"^run {digits_teacher} not found"):
        tracking.local_artifact_dir(digits_teacher)
