"""What the MLflow UI shows of a pipeline and a sweep: run names, params, metric keys and steps, descriptions,
dataset inputs and the saved first view (issue 13, items 1-7), read back from the tracking store."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from conftest import DIGITS, TINY_TEACHER, cli
from kdtrack import config, tracking

EXPERIMENT = "ui"
# The demo's case: students keep 5% of the train labels. Epoch counts differ from tests/test_pipeline.py's, so no step
# of this pipeline is reused from there (step keys ignore the experiment) and neither test sees the other's runs.
TINY = (*TINY_TEACHER, "student.model.hidden=[8]", "student.optim.epochs=3", "data.student_labels=0.05",
        f"experiment={EXPERIMENT}")
STUDENT_EPOCHS, TEACHER_EPOCHS = 3, 2


def _by_hand() -> tuple[int, int]:
    """Train rows and the labels a student keeps, from scikit-learn's class counts and the config by hand: per class
    rint(15%) to val and to test, the rest train, of which round(5%) (at least 1) keep their label."""
    counts = np.bincount(load_digits().target)
    train = counts - 2 * np.rint(counts * 0.15).astype(int)
    return int(train.sum()), int(np.maximum(1, np.round(train * 0.05)).sum())


TRAIN_ROWS, LABELLED_ROWS = _by_hand()  # 1259 and 60, the figures the issue quotes


@pytest.fixture(scope="module", autouse=True)
def fixed_code_version() -> None:
    """One code version for this module's runs: the sweep must reuse the pipeline's steps even when the working tree
    changes between the two (the step key holds a hash of the uncommitted diff)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "code_version", lambda: "test-ui")
        yield


@pytest.fixture(scope="module")
def ui_pipeline(store: str) -> dict[str, str]:
    """Step name -> run id of a pipeline with a KD and a no-KD student, and the parent as "pipeline"."""
    code, out, err = cli("pipeline", "--config", str(DIGITS), "--students", "kd,none",
                         *[a for s in TINY for a in ("--set", s)])
    assert code == 0, err
    parent = out.strip().splitlines()[-1]
    steps = json.loads(MlflowClient().get_run(parent).data.tags["kdtrack.steps"])
    return {"pipeline": parent, **{name: run_id for name, (run_id, _reused) in steps.items()}}


def _run(run_id: str):
    return MlflowClient().get_run(run_id)


def _link(run_id: str) -> str:
    run = _run(run_id)
    return f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_params_say_what_each_run_used(ui_pipeline: dict[str, str]):
    """Item 2: a student logs its own model and data view, teacher and kd settings only when it distils; no run but
    a student logs `method`; the KD/no-KD difference shows in params."""
    kd, none = _run(ui_pipeline["student-kd"]).data.params, _run(ui_pipeline["student-none"]).data.params
    teacher, cache = _run(ui_pipeline["teacher"]).data.params, _run(ui_pipeline["cache"]).data.params
    parent = _run(ui_pipeline["pipeline"]).data.params
    differ = {k for k in kd.keys() | none.keys() if kd.get(k) != none.get(k)}
    assert differ == {"method", "data.train_splits", "data.train_rows", "teacher_mode", "teacher.run_ids",
                      "teacher.models", "cache.checkpoint", "cache.dtype", "cache.views", "kd.alpha", "kd.temperature", "kd.loss_type",
                      "kd.weighting", "kd.warmup_epochs", "kd.ramp_epochs", "train.label_smoothing"}
    assert (kd["data.train_rows"], none["data.train_rows"]) == (str(TRAIN_ROWS), str(LABELLED_ROWS))
    assert kd["data.labelled_rows"] == none["data.labelled_rows"] == str(LABELLED_ROWS)
    assert kd["data.student_labels"] == none["data.student_labels"] == "0.05"
    assert (kd["data.train_splits"], none["data.train_splits"]) == ("train,unlabeled", "train")
    assert (kd["teacher.run_ids"], kd["teacher.models"], kd["teacher_mode"]) == (ui_pipeline["teacher"], "mlp", "cached")
    assert (kd["student.model.name"], kd["student.model.hidden"], kd["student.optim.epochs"]) == ("mlp", "8", "3")
    for params in (kd, none):  # the teacher's settings are not the student's
        assert not {k for k in params if k.startswith(("model.", "optim."))}
    assert teacher["model.name"] == "mlp" and teacher["data.train_rows"] == str(TRAIN_ROWS)
    assert not {k for k in teacher if k.split(".")[0] in ("method", "kd", "student", "teacher_mode", "cache")}
    assert "data.student_labels" not in teacher  # teachers see every label
    assert "method" not in cache and cache["teacher.run_ids"] == ui_pipeline["teacher"]
    assert cache["cache.rows"] == str(TRAIN_ROWS) and cache["cache.splits"] == "train,unlabeled"
    assert "method" not in parent and parent["students"] == "kd,none"


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_one_name_per_loss_and_one_ce_for_both_students(ui_pipeline: dict[str, str]):
    """Item 3: the KD student logs the weighted terms that sum to `train/loss` and the unweighted CE on labelled rows
    (`train/ce_labelled`) that the baseline logs too; no synonyms."""
    client = MlflowClient()
    kd, none = ui_pipeline["student-kd"], ui_pipeline["student-none"]
    summaries = {"test/acc", "best/epoch", "best/val_acc"}
    epochs = {"train/loss", "train/acc", "train/loss_ce", "train/ce_labelled", "val/loss", "val/acc", "lr",
              "epoch_seconds", "data_seconds"}
    assert set(_run(kd).data.metrics) == epochs | summaries | {
        "train/loss_kd", "train/kd_weight", "train/coverage", "train/avg_confidence", "test/agreement",
        "test/kl_to_teacher"}
    assert set(_run(none).data.metrics) == epochs | summaries

    def history(run_id: str, key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    loss, ce, kd_term = (history(kd, k) for k in ("train/loss", "train/loss_ce", "train/loss_kd"))
    plain, weight = history(kd, "train/ce_labelled"), history(kd, "train/kd_weight")
    assert weight == pytest.approx([0.7] * STUDENT_EPOCHS)
    assert loss == pytest.approx([c + k for c, k in zip(ce, kd_term)], rel=1e-5)
    assert ce == pytest.approx([0.3 * p for p in plain], rel=1e-5)  # loss_ce is weighted, ce_labelled is not
    assert history(none, "train/ce_labelled") == pytest.approx(history(none, "train/loss_ce"), rel=1e-6)


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_summaries_are_logged_once_at_step_zero(ui_pipeline: dict[str, str]):
    """Item 4: test/* and best/* are one value at step 0 (a bar in the UI); curves keep step = epoch."""
    client = MlflowClient()
    for step, epochs, summaries in (("teacher", TEACHER_EPOCHS, ("test/acc", "test/loss", "best/epoch", "best/val_acc")),
                                    ("student-kd", STUDENT_EPOCHS, ("test/acc", "test/agreement", "best/epoch")),
                                    ("student-none", STUDENT_EPOCHS, ("test/acc", "best/val_acc"))):
        run_id = ui_pipeline[step]
        for key in summaries:
            assert [m.step for m in client.get_metric_history(run_id, key)] == [0], (step, key)
        assert sorted(m.step for m in client.get_metric_history(run_id, "val/acc")) == list(range(epochs)), step


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_descriptions_and_datasets_name_the_lineage(ui_pipeline: dict[str, str]):
    """Item 5: the KD student's description links its teacher and cache runs; each data view has its own dataset
    name; the logits input is named after the cache run and carries the cache key under its own name."""
    kd, none = _run(ui_pipeline["student-kd"]), _run(ui_pipeline["student-none"])
    teacher, cache = ui_pipeline["teacher"], _run(ui_pipeline["cache"])
    rows = f"{TRAIN_ROWS} training rows (train={LABELLED_ROWS}, unlabeled={TRAIN_ROWS - LABELLED_ROWS})"
    assert kd.data.tags["mlflow.note.content"] == (
        f"Student mlp by kd from the cached logits of teacher {_link(teacher)} (cache {_link(cache.info.run_id)}); "
        f"{rows}.")
    assert none.data.tags["mlflow.note.content"] == (
        f"Student mlp without distillation, from labels only; {LABELLED_ROWS} training rows (train={LABELLED_ROWS}).")

    def inputs(run) -> dict[str, tuple[str, str, dict]]:
        return {i.dataset.name: ({t.key: t.value for t in i.tags}["mlflow.data.context"], i.dataset.digest,
                                 json.loads(i.dataset.source)["tags"]) for i in run.inputs.dataset_inputs}

    assert set(inputs(_run(teacher))) == {"digits/train+val+test"}
    assert set(inputs(cache)) == {"digits/5% labels/train+unlabeled"}
    assert set(inputs(none)) == {"digits/5% labels/train"}
    kd_inputs = inputs(kd)
    assert set(kd_inputs) == {"digits/5% labels/train+unlabeled", "cache-teacher-mlp-digits"}
    assert cache.info.run_name == "cache-teacher-mlp-digits"
    context, digest, source = kd_inputs["cache-teacher-mlp-digits"]
    key = cache.data.tags["kdtrack.cache_key"]
    assert (context, digest) == ("teacher_logits", key[:32])
    assert source == {"cache_run_id": cache.info.run_id, "teacher_run_id": teacher, "kdtrack.cache_key": key}
    assert kd_inputs["digits/5% labels/train+unlabeled"][2]["kdtrack.dataset_digest"] == kd.data.tags[
        "kdtrack.dataset_digest"]


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_sweep_names_seeds_and_lists_a_reused_student(ui_pipeline: dict[str, str]):
    """Items 1 and 6: a sweep over two seeds reuses the pipeline's KD student for seed 0 (same step key) and trains
    seed 1; the new run's name says its seed, and the sweep parent lists and links both students."""
    code, out, err = cli("sweep", "--config", str(DIGITS), "--seeds", "0,1", *[a for s in TINY for a in ("--set", s)])
    assert code == 0, err
    parent = _run(out.strip().splitlines()[-1])
    reused = ui_pipeline["student-kd"]
    ids = parent.data.tags["kdtrack.student_run_ids"].split(",")
    assert ids[0] == reused and len(ids) == 2 and ids[1] != reused, err
    new = _run(ids[1])
    assert new.info.run_name == "student-kd-t4-a0.7-seed1" and new.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert _run(reused).data.tags["mlflow.parentRunId"] == ui_pipeline["pipeline"]  # a child of the pipeline still
    assert len({_run(i).info.run_name for i in ids}) == 2
    assert parent.data.tags["mlflow.note.content"].splitlines()[2:] == [
        f"- default, seed 0: {_link(reused)} (reused, a child of {_link(ui_pipeline['pipeline'])})",
        f"- default, seed 1: {_link(ids[1])}"]


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_first_view_is_a_saved_students_table(ui_pipeline: dict[str, str]):
    """Item 7: the pipeline saves a view of the experiment's runs table (students, the columns that matter) that the
    UI loads from `?viewStateShareKey=`, and the URL opens the runs tab with it."""
    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT)
    envelope = json.loads(experiment.tags["mlflow.sharedViewState.kdtrack-students"])
    assert envelope["name"] == "kdtrack students" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == "tags.`kdtrack.stage` = 'student'"
    assert state["groupBy"] == {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "method"}]}
    assert state["selectedColumns"] == [
        "params.`method`", "params.`kd.alpha`", "params.`kd.temperature`", "params.`seed`", "params.`data.train_rows`",
        "params.`data.labelled_rows`", "metrics.`test/acc`", "metrics.`test/agreement`", "metrics.`best/val_acc`"]
    assert tracking.runs_view_url(EXPERIMENT, "kdtrack-students") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        "?viewStateShareKey=kdtrack-students&compareRunsMode=TABLE")
    # the view names param keys the students log
    for key in ("method", "kd.alpha", "kd.temperature", "seed", "data.train_rows", "data.labelled_rows"):
        assert key in _run(ui_pipeline["student-kd"]).data.params, key


@pytest.mark.slow  # the ui_pipeline fixture runs a whole pipeline end to end: teacher, cache, two students
def test_a_resumed_run_config_still_matches(ui_pipeline: dict[str, str]):
    """The params are a view: the resolved config a resume compares against is config.yaml, still whole."""
    logged = tracking.load_run_config(ui_pipeline["student-none"], config.Config)
    assert logged.kd == config.load(DIGITS).kd and logged.method == "none"


def test_artifact_downloads_draw_no_progress_bars_on_stderr(store: str, monkeypatch):
    """MLflow draws a bar per download whenever tqdm is importable; stderr is for notes and one-line errors."""
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    tracking.configure()
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # a user's own choice stays
    tracking.configure()
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"


def test_clients_are_kept_for_the_last_eight_stores_of_this_process(store: str, monkeypatch) -> None:
    """The clients configure() keeps are bounded: eight stores, the least recently made client let go first, and
    none of a parent process's clients in a forked one. (Clients of http stores: made without contacting one.)"""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # configure() sets these for an http store; restored afterwards
    monkeypatch.setattr(tracking, "_clients", {})
    uris = [f"http://127.0.0.1:9/store{i}" for i in range(10)]
    made = {}
    for uri in uris:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        made[uri] = tracking.configure()
    assert [uri for uri, _pid in tracking._clients] == uris[2:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris[5])
    assert tracking.configure() is made[uris[5]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uris[0])
    assert tracking.configure() is not made[uris[0]]  # let go, so made again
    assert [uri for uri, _pid in tracking._clients] == [*uris[3:], uris[0]]
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a forked child
    child = tracking.configure()
    assert child is not made[uris[0]] and list(tracking._clients) == [(uris[0], -1)]


@pytest.mark.slow  # creates a second tracking store and starts a process (over a second on 2 cores)
def test_one_client_per_store_and_process(store: str, monkeypatch, tmp_path):
    """configure() runs for every read: it hands back the client it made for the same store, a new one for another
    store."""
    client = tracking.configure()
    assert tracking.configure() is client and client.tracking_uri == store
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.configure() is not client and tracking.configure().tracking_uri == other
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.configure() is client
