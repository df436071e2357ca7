"""Bad inputs through the CLI: each ends with its own one-line error and exit code, no traceback, no run left
RUNNING and no cache marked complete. Also: unsafe checkpoints and escaping manifest paths are refused."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, cli, free_port, set_args, subprocess_env
from kdtrack import checkpoint, config, store_health, tracking
from kdtrack.errors import TrackingError
from kdtrack.stages import recompute_logits, train_teacher

MISSING_RUN = "0123456789abcdef0123456789abcdef"
EXPERIMENT = "bad-inputs"


@dataclass
class Ctx:
    """What the cases refer to: real runs of the session store and a scratch folder."""

    teacher: str
    victim: str  # a teacher whose checkpoint the cases damage (restored after each case)
    cache: str
    plain: str  # an MLflow run that kdtrack did not make
    tmp: Path


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def ctx(digits_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    victim = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=1", f"experiment={EXPERIMENT}"]))
    code, out, err = cli("cache-logits", "--teacher-run-id", digits_teacher, "--config", str(DIGITS),
                          "--set", f"experiment={EXPERIMENT}")
    assert code == 0, err
    client = MlflowClient()
    # the module's fixtures run again when its tests are interleaved with others' (mutmut orders tests by time)
    found = client.get_experiment_by_name(f"{EXPERIMENT}-plain")
    plain_experiment = found.experiment_id if found else client.create_experiment(f"{EXPERIMENT}-plain")
    plain = client.create_run(plain_experiment).info.run_id
    client.set_terminated(plain, "FINISHED")
    return Ctx(digits_teacher, victim, out.strip(), plain, tmp_path_factory.mktemp("bad"))


# --- scratch inputs -------------------------------------------------------------------------------------------------

def _manifest(c: Ctx, name: str, entries: list[dict], files: dict[str, np.ndarray] | None = None) -> str:
    """A manifest under its own data root: 20 good digits-shaped train/val samples, then `entries`."""
    root = c.tmp / name
    root.mkdir()
    good = []
    for i in range(20):
        np.save(root / f"s{i}.npy", np.full((1, 8, 8), i, dtype=np.float32))
        good.append({"file": f"s{i}.npy", "label": i % 10, "split": "train" if i < 16 else "val"})
    for rel, arr in (files or {}).items():
        np.save(root / rel, arr)
    path = root / "manifest.json"
    path.write_text(json.dumps(good + entries))
    return str(path)


def _escaping(c: Ctx) -> str:
    np.save(c.tmp / "outside.npy", np.zeros((1, 8, 8), dtype=np.float32))
    return _manifest(c, "escaping", [{"file": "../outside.npy", "label": 0, "split": "train"}])


def _symlink(c: Ctx) -> str:
    np.save(c.tmp / "secret.npy", np.zeros((1, 8, 8), dtype=np.float32))
    path = _manifest(c, "symlink", [{"file": "link.npy", "label": 0, "split": "train"}])
    (c.tmp / "symlink" / "link.npy").symlink_to(c.tmp / "secret.npy")
    return path


def _nan(c: Ctx) -> str:
    bad = np.zeros((1, 8, 8), dtype=np.float32)
    bad[0, 3, 3] = np.nan
    return _manifest(c, "nan", [{"file": "bad.npy", "label": 1, "split": "train"}], {"bad.npy": bad})


def _file(c: Ctx, name: str, text: str) -> str:
    (c.tmp / name).write_text(text)
    return str(c.tmp / name)


def _bytes(c: Ctx, name: str, data: bytes) -> str:
    (c.tmp / name).write_bytes(data)
    return str(c.tmp / name)


def _blocked_expert(c: Ctx) -> str:
    """An export folder whose <expert> entry is a file."""
    (c.tmp / "export-dir").mkdir(exist_ok=True)
    (c.tmp / "export-dir" / c.teacher).write_text("")
    return str(c.tmp / "export-dir")


def _best_pt(run_id: str) -> Path:
    return tracking.local_artifact_dir(run_id) / "checkpoints" / "best.pt"


class _RunsCode:
    """Unpickling this would create the file at `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tamper_weights(c: Ctx) -> None:
    """Change one weight but keep the recorded hash, as bit rot or a careless edit would."""
    payload = checkpoint.load(_best_pt(c.victim))
    next(iter(payload["state_dict"].values())).view(-1)[0] += 1.0
    checkpoint.save(_best_pt(c.victim), payload)


def _plant_pickle(c: Ctx) -> None:
    torch.save({"state_dict": {}, "spec": _RunsCode(c.tmp / "pwned")}, _best_pt(c.victim))


Undo = Callable[[], None]


def _store_db() -> Path:
    return Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))


def _lock_store(c: Ctx) -> Undo:
    """Another writer holds the session store's exclusive lock (kdtrack waits 0.2 s for it, not 20 s)."""
    db = sqlite3.connect(_store_db(), isolation_level=None, timeout=5)
    db.execute("BEGIN EXCLUSIVE")
    busy, store_health.SQLITE_BUSY_S = store_health.SQLITE_BUSY_S, 0.2
    tracking._checked_stores.clear()  # as in a new process, which checks its store once before MLflow opens it

    def undo() -> None:
        store_health.SQLITE_BUSY_S = busy
        db.execute("ROLLBACK")
        db.close()

    return undo


def _use_store(uri: str | None, cwd: Path | None = None) -> Undo:
    """MLFLOW_TRACKING_URI (None: unset) and the working directory, until undone."""
    old_uri, old_cwd = os.environ["MLFLOW_TRACKING_URI"], Path.cwd()
    os.environ.pop("MLFLOW_TRACKING_URI")
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    if cwd:
        os.chdir(cwd)

    def undo() -> None:
        os.chdir(old_cwd)
        os.environ["MLFLOW_TRACKING_URI"] = old_uri
        mlflow.set_tracking_uri(old_uri)

    return undo


def _bad_store(c: Ctx, name: str, content: bytes) -> Undo:
    folder = c.tmp / name
    folder.mkdir()
    (folder / "mlflow.db").write_bytes(content)
    return _use_store(f"sqlite:///{folder / 'mlflow.db'}")


def _mlruns_a_file(c: Ctx) -> Undo:
    """The default store (MLFLOW_TRACKING_URI unset) in a folder where `mlruns`, its artifact root, is a file."""
    folder = c.tmp / "mlruns-file"
    folder.mkdir()
    (folder / "mlruns").write_text("not a folder")
    return _use_store(None, folder)


# --- the catalogue --------------------------------------------------------------------------------------------------

TEACHER, STUDENT = ("cache-logits", "--config", str(DIGITS)), ("train-student", "--config", str(DIGITS))
Args = Callable[[Ctx], list[str]]


def _case(id_: str, code: int, text: str, args: Args, setup: Callable[[Ctx], Undo | None] | None = None):
    """`setup` changes something before the command runs; a callable it returns undoes that afterwards."""
    return pytest.param(code, text, args, setup, id=id_)


def _manifest_case(id_: str, text: str, make: Callable[[Ctx], str]):
    return _case(id_, 2, text, lambda c: ["cache-logits", "--teacher-run-id", c.teacher, "--set", "data.source=manifest",
                                          "--set", f"data.manifest={make(c)}"])


CASES = [
    # run ids
    _case("teacher-unknown", 2, f"teacher run {MISSING_RUN} not found",
          lambda c: [*TEACHER, "--teacher-run-id", MISSING_RUN]),
    _case("teacher-is-cache-run", 2, "is a cache run, not a teacher",
          lambda c: [*TEACHER, "--teacher-run-id", c.cache]),
    _case("student-teacher-not-kdtrack", 2, "is not a kdtrack run, not a teacher",
          lambda c: [*STUDENT, "--teacher-run-id", c.plain]),
    _case("verify-unknown-run", 2, f"run {MISSING_RUN} not found in",
          lambda c: ["verify-cache", "--run-id", MISSING_RUN]),
    _case("verify-teacher-run", 2, "is a teacher run, not a cache",
          lambda c: ["verify-cache", "--run-id", c.teacher]),
    _case("lineage-unknown-run", 2, f"run {MISSING_RUN} not found in", lambda c: ["lineage", MISSING_RUN]),
    _case("fetch-unknown-run", 2, f"run {MISSING_RUN} not found in",
          lambda c: ["fetch", "--run-id", MISSING_RUN, "--out", str(c.tmp / "f")]),
    _case("fetch-not-kdtrack-run", 2, "is a non-kdtrack run with nothing to fetch",
          lambda c: ["fetch", "--run-id", c.plain, "--out", str(c.tmp / "f")]),
    _case("resume-teacher-unknown", 2, f"run {MISSING_RUN} not found in",
          lambda c: ["train-teacher", "--resume", MISSING_RUN]),
    _case("resume-student-unknown", 2, f"run {MISSING_RUN} not found in",
          lambda c: ["train-student", "--resume", MISSING_RUN]),
    _case("resume-with-overrides", 2, "--resume takes the run's own config",
          lambda c: ["train-teacher", "--resume", c.teacher, "--set", "seed=1"]),
    # checkpoints
    _case("checkpoint-missing", 2, "has no checkpoint 'best' (it has: last)",
          lambda c: [*TEACHER, "--teacher-run-id", c.victim], lambda c: _best_pt(c.victim).unlink()),
    _case("checkpoint-truncated", 1, "is corrupt or truncated",
          lambda c: [*TEACHER, "--teacher-run-id", c.victim], lambda c: _best_pt(c.victim).write_bytes(b"PK\x03\x04")),
    _case("checkpoint-weights-changed", 1, "is corrupt: weights hash",
          lambda c: [*TEACHER, "--teacher-run-id", c.victim], _tamper_weights),
    _case("checkpoint-pickle-payload", 1, "was refused as unsafe",
          lambda c: [*TEACHER, "--teacher-run-id", c.victim], _plant_pickle),
    # data and student
    _case("wrong-class-count", 2, "outputs 10 classes but the data has 5",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "teacher_mode=online",
                     "--set", "data.source=synthetic", "--set", "data.num_classes=5", "--set", "data.num_samples=200"]),
    _case("wrong-input-shape", 2, "takes inputs of shape (1, 8, 8) but the data's samples have shape (1, 4, 4)",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "teacher_mode=online",
                     "--set", "data.source=synthetic", "--set", "data.input_shape=[1,4,4]",
                     "--set", "data.num_samples=200"]),
    _case("student-no-cache-for-digest", 2, "no finished cache for teacher run",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "data.seed=9"]),
    _case("student-kd-without-teacher", 2, "method kd needs a teacher", lambda c: [*STUDENT]),
    _case("feature-method-cached", 2, "method rkd reads the teacher's features",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "method=rkd"]),
    _case("fusion-weight-count", 2, "kd.fusion=weighted needs 1 weights, got 3",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "kd.fusion=weighted",
                     "--set", "kd.fusion_weights=[1,2,3]"]),
    _case("kd-unknown-domain", 2, "kd.domain='night' is not a domain of the training data",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "kd.domain=night"]),
    _case("split-leakage", 2, "is in split 'test', which is held out from distillation",
          lambda c: [*TEACHER, "--teacher-run-id", c.teacher, "--split", "train", "--split", "test"]),
    _case("split-not-in-data", 2, "split 'calibration' is not in this digits dataset",
          lambda c: [*TEACHER, "--teacher-run-id", c.teacher, "--split", "calibration", "--allow-split", "calibration"]),
    _case("recompute-missing-index-file", 2, "nope_indices.json not found",
          lambda c: ["recompute-logits", "--config", str(DIGITS), "--teacher-run-id", c.teacher,
                     "--splits", str(c.tmp / "nope_indices.json")]),
    _case("index-splits-folder-missing", 2, "index-split folder",
          lambda c: ["train-teacher", "--config", str(DIGITS), "--set", f"data.index_splits={c.tmp / 'no-such'}"]),
    _case("synthetic-one-class", 2, "synthetic needs at least 2 classes",
          lambda c: ["train-teacher", "--set", "data.source=synthetic", "--set", "data.num_classes=1"]),
    _case("student-labels-out-of-range", 2, "data.student_labels=1.5 is outside (0, 1]",
          lambda c: [*STUDENT, "--set", "method=none", "--set", "data.student_labels=1.5"]),
    # manifests
    _manifest_case("manifest-escaping-path", "points outside the data root", _escaping),
    _manifest_case("manifest-absolute-path", "has an absolute file path",
                   lambda c: _manifest(c, "absolute", [{"file": str(c.tmp / "x.npy"), "label": 0, "split": "train"}])),
    _manifest_case("manifest-symlink-outside", "points outside the data root", _symlink),
    _manifest_case("manifest-missing-file", "1 of 21 feature files are missing",
                   lambda c: _manifest(c, "missing", [{"file": "gone.npy", "label": 0, "split": "train"}])),
    _manifest_case("manifest-bad-split", "has unknown split 'trian'",
                   lambda c: _manifest(c, "split", [{"file": "s0.npy", "label": 0, "split": "trian"}])),
    _manifest_case("manifest-bad-label", "has label 12 out of range 0..9",
                   lambda c: _manifest(c, "label", [{"file": "x.npy", "label": 12, "split": "train"}],
                                       {"x.npy": np.zeros((1, 8, 8), dtype=np.float32)})),
    _manifest_case("manifest-nan-feature", "contains NaN or Inf feature values", _nan),
    _manifest_case("manifest-not-json", "is not valid JSON", lambda c: _file(c, "broken.json", '[{"file": ')),
    # config
    _case("config-unknown-key", 2, "unknown config key optim.lrr",
          lambda c: ["train-teacher", "--set", "optim.lrr=0.1"]),
    _case("config-bad-type", 2, "optim.epochs must be int, got str 'ten'",
          lambda c: ["train-teacher", "--set", "optim.epochs=ten"]),
    _case("config-bad-choice", 2, "cache.dtype='float64' is not allowed",
          lambda c: [*TEACHER, "--teacher-run-id", c.teacher, "--set", "cache.dtype=float64"]),
    _case("config-not-key-value", 2, "override 'seed' is not of the form key=value",
          lambda c: ["train-teacher", "--set", "seed"]),
    _case("config-file-missing", 2, "config file nope.yaml not found",
          lambda c: ["train-teacher", "--config", "nope.yaml"]),
    _case("config-bad-yaml", 2, "is not valid YAML",
          lambda c: ["train-teacher", "--config", _file(c, "bad.yaml", "optim: [1,\n")]),
    _case("config-section-as-value", 2, "optim is a section, not a value",
          lambda c: ["train-teacher", "--set", "optim=3"]),
    _case("pipeline-unknown-method", 2, "method='distil' is not allowed",
          lambda c: ["pipeline", "--config", str(DIGITS), "--students", "kd,distil"]),
    _case("sweep-bad-seeds", 2, "--seeds 'a,b' is not a list of integers",
          lambda c: ["sweep", "--config", str(DIGITS), "--seeds", "a,b"]),
    _case("sweep-no-seeds", 2, "no seeds given in --seeds ','",
          lambda c: ["sweep", "--config", str(DIGITS), "--seeds", ","]),
    _case("config-empty-experiment", 2, "experiment is empty", lambda c: ["train-teacher", "--set", "experiment="]),
    _case("config-blank-experiment-in-file", 2, "experiment is empty",
          lambda c: ["train-teacher", "--config", _file(c, "blank.yaml", "experiment: '  '\n")]),
    _case("config-negative-momentum", 2, "optim.momentum=-0.5 must be >= 0",
          lambda c: ["train-teacher", "--set", "optim.momentum=-0.5"]),
    _case("config-negative-weight-decay", 2, "optim.weight_decay=-0.001 must be >= 0",
          lambda c: ["train-teacher", "--set", "optim.weight_decay=-1e-3"]),
    _case("config-negative-student-momentum", 2, "student.optim.momentum=-1.0 must be >= 0",
          lambda c: [*STUDENT, "--set", "method=none", "--set", "student.optim.momentum=-1"]),
    _case("config-negative-student-weight-decay", 2, "student.optim.weight_decay=-0.1 must be >= 0",
          lambda c: [*STUDENT, "--set", "method=none", "--set", "student.optim.weight_decay=-0.1"]),
    _case("config-seed-overflows-64-bits", 2, "seed=99999999999999999999 is outside 0..18446744073709551615",
          lambda c: ["train-teacher", "--set", "seed=99999999999999999999"]),
    _case("config-binary-file", 2, "is not a text file (byte 0 is not UTF-8)",
          lambda c: ["train-teacher", "--config", _bytes(c, "noise.yaml", bytes(range(128, 256)) * 8)]),
    _case("config-png-file", 2, "is not a text file (byte 0 is not UTF-8)",
          lambda c: ["train-teacher", "--config", _bytes(c, "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")]),
    _case("config-number-key", 2, "has the key 1 at the top level, which is not a config key name",
          lambda c: ["train-teacher", "--config", _file(c, "numkey.yaml", "1: 2\nseedd: 3\n")]),
    _case("config-number-key-in-section", 2, "has the key 1 in section optim, which is not a config key name",
          lambda c: ["train-teacher", "--config", _file(c, "numkey2.yaml", "optim:\n  lr: 0.1\n  1: 2\n")]),
    _case("config-list-key", 2, "has a list or mapping as a key (line 1), not a config key name",
          lambda c: ["train-teacher", "--config", _file(c, "listkey.yaml", "? [a, b]\n: 3\n")]),
    _case("config-verify-rows-zero", 2, "cache.verify_rows=0 must be >= 1",
          lambda c: [*TEACHER, "--teacher-run-id", c.teacher, "--set", "cache.verify_rows=0"]),
    _case("config-kd-alpha-out-of-range", 2, "kd.alpha=1.5 is outside 0..1 — e.g. --set kd.alpha=0.7",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "kd.alpha=1.5"]),
    _case("config-eval-batch-size-zero", 2, "data.eval_batch_size=0 must be >= 1 — e.g. --set data.eval_batch_size=",
          lambda c: ["train-teacher", "--set", "data.eval_batch_size=0"]),
    _case("config-temperature-zero", 2, "kd.temperature=0.0 must be > 0 — e.g. --set kd.temperature=4.0",
          lambda c: [*STUDENT, "--teacher-run-id", c.teacher, "--set", "kd.temperature=0"]),
    # output
    _case("fetch-out-under-a-file", 2, "cannot create output folder",
          lambda c: ["fetch", "--run-id", c.teacher, "--out", _file(c, "a-file", "") + "/models"]),
    _case("export-npz-under-a-file", 2, "cannot create output folder",  # (--export-npz a file: click refuses it)
          lambda c: ["recompute-logits", "--config", str(DIGITS), "--teacher-run-id", c.teacher, "--splits", "val",
                     "--export-npz", _file(c, "export-file", "") + "/npz"]),
    _case("export-npz-expert-is-a-file", 2, "cannot create output folder",
          lambda c: ["recompute-logits", "--config", str(DIGITS), "--teacher-run-id", c.teacher, "--splits", "val",
                     "--export-npz", _blocked_expert(c)]),
    # the tracking store
    _case("store-locked", 1, "mlflow.db is locked by another process (database is locked) — retry once",
          lambda c: ["train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER)], _lock_store),
    _case("store-not-a-database", 1, "mlflow.db is corrupt: not an SQLite database — restore it from a backup",
          lambda c: ["lineage", c.teacher], lambda c: _bad_store(c, "noise-db", bytes(range(256)) * 64)),
    _case("store-truncated", 1, "mlflow.db is truncated: ",
          lambda c: ["train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER)],
          lambda c: _bad_store(c, "half-db", _store_db().read_bytes()[:_store_db().stat().st_size // 2])),
    _case("store-mlruns-is-a-file", 1, "mlruns is a file, but the tracking store sqlite:///mlflow.db keeps its",
          lambda c: ["train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER)], _mlruns_a_file),
]


def _complete_caches() -> tuple[set[str], set[Path]]:
    """Cache runs tagged complete, and logits.zarr stores whose attributes say complete, in the whole store."""
    runs = {r.info.run_id for r in tracking.find_runs({"kdtrack.complete": "true"},
                                                      statuses=("RUNNING", "FINISHED", "FAILED", "KILLED"))}
    stores = {p.parent for p in Path.cwd().rglob("logits.zarr/zarr.json") if _says_complete(p)}
    return runs, stores


def _says_complete(metadata: Path) -> bool:
    """A store's zarr.json says complete (other tests leave torn ones behind in the session's folder)."""
    try:
        return json.loads(metadata.read_text()).get("attributes", {}).get("complete") is True
    except ValueError:
        return False


def _running() -> list[str]:
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")]


def _assert_one_line_error(err: str, text: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert " — " in errors[0] and text in errors[0], err


@pytest.mark.parametrize(("code", "text", "args", "setup"), CASES)
def test_bad_input(ctx: Ctx, code: int, text: str, args: Args, setup: Callable[[Ctx], Undo | None] | None):
    best = _best_pt(ctx.victim)
    kept = best.read_bytes()
    before = _complete_caches()
    undo = None
    try:
        if setup:
            undo = setup(ctx)
        exit_code, _out, err = cli(*args(ctx))
    finally:
        if callable(undo):
            undo()
        best.write_bytes(kept)
    _assert_one_line_error(err, text)
    assert exit_code == code, err
    assert _running() == []
    runs, stores = _complete_caches()
    assert runs <= before[0] and stores <= before[1]


def test_catalogue_is_large_and_distinct():
    assert len(CASES) >= 25
    assert len({p.values[1] for p in CASES}) >= 25


def test_pickle_payload_never_runs(ctx: Ctx):
    marker = ctx.tmp / "pwned"
    best = _best_pt(ctx.victim)
    kept = best.read_bytes()
    try:
        _plant_pickle(ctx)
        code, _out, err = cli(*TEACHER, "--teacher-run-id", ctx.victim)
    finally:
        best.write_bytes(kept)
    assert code == 1 and not marker.exists()
    _assert_one_line_error(err, f"checkpoint {best} was refused as unsafe")


@pytest.mark.slow  # kdtrack processes, each waiting out its HTTP retries against a closed port
@pytest.mark.parametrize("command", [["lineage", MISSING_RUN],
                                     ["train-student", "--set", "method=none", "--set", "student.optim.epochs=1"]],
                         ids=["lineage", "train-student"])
def test_unreachable_tracking_server_fails_fast(command: list[str], store: str):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", "kdtrack", *command], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 1, out.stderr
    _assert_one_line_error(out.stderr, uri)
    assert "start the server or fix MLFLOW_TRACKING_URI" in out.stderr
    assert _running() == []


@pytest.mark.slow  # the retry trains a teacher end to end (~1.5 s on 2 cores)
def test_locked_store_starts_no_run_and_a_retry_works(ctx: Ctx):
    command = ["train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER, "experiment=locked-store")]
    undo = _lock_store(ctx)
    try:
        code, _out, err = cli(*command)
    finally:
        undo()
    assert code == 1
    _assert_one_line_error(err, "is locked by another process")
    experiment = MlflowClient().get_experiment_by_name("locked-store")
    assert experiment is None or not MlflowClient().search_runs([experiment.experiment_id])
    code, out, err = cli(*command)
    assert code == 0, err
    assert MlflowClient().get_run(out.strip()).info.status == "FINISHED"


def test_store_errors_met_during_a_run_are_named(store: str):
    """What MLflow raises when the store locks up or breaks after kdtrack's own checks passed (e.g. at start_run)."""
    from mlflow.exceptions import MlflowException

    locked = MlflowException("(sqlite3.OperationalError) database is locked\n[SQL: INSERT INTO runs ...]")
    assert str(tracking.store_error(locked)) == (f"tracking store {store} is locked by another process (database is "
                                                 "locked) — retry once the other process has finished writing to it")
    cause = sqlite3.DatabaseError("database disk image is malformed")
    try:
        raise MlflowException("SQLAlchemy error") from cause
    except MlflowException as exc:
        assert "is corrupt or truncated (database disk image is malformed)" in str(tracking.store_error(exc))
    other = TrackingError("cannot start a run", "check the run id")
    assert tracking.store_error(MlflowException("RESOURCE_DOES_NOT_EXIST"), other) is other


@pytest.mark.slow  # a kdtrack process (imports torch and mlflow)
def test_corrupt_store_in_a_real_process_prints_one_line(ctx: Ctx):
    """Nothing else (e.g. MLflow logging a traceback) reaches stderr when the CLI runs as its own process."""
    folder = ctx.tmp / "corrupt-subprocess"
    folder.mkdir()
    (folder / "mlflow.db").write_bytes(_store_db().read_bytes()[:8192])
    out = subprocess.run([sys.executable, "-m", "kdtrack", "lineage", ctx.teacher], capture_output=True, text=True,
                         env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}"), timeout=120)
    assert out.returncode == 1, out.stderr
    _assert_one_line_error(out.stderr, "mlflow.db is truncated: 8192 of ")


def test_failed_npz_export_leaves_no_file_under_its_name(ctx: Ctx, monkeypatch: pytest.MonkeyPatch):
    """An export cut short midway (here: the disk fills up) leaves neither a truncated .npz nor its temporary file."""
    real_savez = np.savez

    def savez_then_disk_full(file, **arrays):
        real_savez(file, **arrays)
        if isinstance(file, (str, Path)):
            os.truncate(file, Path(file).stat().st_size // 2)
        else:
            file.truncate(file.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recompute_logits.np, "savez", savez_then_disk_full)
    out_dir = ctx.tmp / "export-cut"
    code, _out, err = cli("recompute-logits", "--config", str(DIGITS), "--teacher-run-id", ctx.teacher,
                          "--splits", "val", "--export-npz", str(out_dir), "--set", f"experiment={EXPERIMENT}")
    assert code == 1
    _assert_one_line_error(err, f"cannot write {out_dir / ctx.teacher / 'val_logits.npz'} (No space left on device)")
    assert list((out_dir / ctx.teacher).iterdir()) == []
    assert _running() == []


def test_verify_cache_after_the_data_changed(ctx: Ctx):
    """A cache built for one manifest, verified after a sample was added to it: coverage fails, store incomplete."""
    path = Path(_manifest(ctx, "grows", []))
    code, out, err = cli("cache-logits", "--teacher-run-id", ctx.teacher, "--set", "data.source=manifest",
                          "--set", f"data.manifest={path}", "--set", f"experiment={EXPERIMENT}")
    assert code == 0, err
    run_id = out.strip()
    np.save(path.parent / "new.npy", np.ones((1, 8, 8), dtype=np.float32))
    path.write_text(json.dumps([*json.loads(path.read_text()), {"file": "new.npy", "label": 3, "split": "train"}]))
    code, out, err = cli("verify-cache", "--run-id", run_id, "--recompute", "4")
    assert code == 1 and "new.npy" in out, out
    _assert_one_line_error(err, f"cache run {run_id} failed verification")
    assert MlflowClient().get_run(run_id).data.tags["kdtrack.complete"] == "false"
    assert _running() == []
