"""Teachers and students as MLflow models: logged with every run, loaded by runs:/ and registry URIs, registered."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, _stop_group, cli, free_port, set_args, subprocess_env
from kdtrack import checkpoint, config, mlflow_model, tracking
from kdtrack.data import Normalisation, build_dataset
from kdtrack.errors import BadInput, CheckpointError
from kdtrack.models import ModelSpec, build_model
from kdtrack.stages import cache_logits

STUDENT = ("student.model.name=mlp", "student.model.hidden=[16]", "student.optim.epochs=3", "train.progress=off",
           "experiment=mlflow-models")
REGISTERED = "digits-student"

# A fresh Python that loads the model by each URI given and saves what it predicts for the rows in x.npy; kdtrack's
# own import hook is removed first, so `import kdtrack` can only find the copy inside the model.
LOADER = """
import sys, numpy as np, mlflow
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") + repr(f)]
x = np.load("x.npy")
for i, uri in enumerate(sys.argv[1:]):
    np.save(f"y{i}.npy", mlflow.pyfunc.load_model(uri).predict(x))
import kdtrack
print(kdtrack.__file__)
"""


def _checkpoint_predicts(path: Path, x: np.ndarray) -> np.ndarray:
    """What the checkpoint's own network outputs for raw rows x, normalised as training normalised them."""
    payload = checkpoint.load(path)
    model = build_model(ModelSpec.from_dict(payload["spec"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    with torch.inference_mode():
        return model(Normalisation.from_dict(payload["normalisation"]).apply(torch.from_numpy(x))).numpy()


def _raw_rows(n: int) -> np.ndarray:
    return build_dataset(config.load(DIGITS).data).select(["test"]).features[:n]


def _model_dir(run_id: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(dst)))


def _changed_checkpoint(path: Path, dst: Path) -> Path:
    """A valid checkpoint (its own hash right) whose weights differ from `path`'s in one value."""
    payload = checkpoint.load(path)
    state = {k: v.clone() for k, v in payload["state_dict"].items()}
    first = next(iter(state))
    state[first].view(-1)[0] += 1.0
    payload.update(state_dict=state, weights_sha256=checkpoint.weights_sha256(state))
    checkpoint.save(dst, payload)
    return dst


def test_a_teacher_run_logs_its_best_checkpoint_as_a_model(digits_teacher: str, tmp_path: Path):
    run = tracking.get_run(digits_teacher)
    (logged,) = MlflowClient().search_logged_models(experiment_ids=[run.info.experiment_id],
                                                    filter_string=f"source_run_id = '{digits_teacher}'")
    assert logged.name == "model"
    folder = _model_dir(digits_teacher, tmp_path)
    best = Path(mlflow.artifacts.download_artifacts(run_id=digits_teacher, artifact_path="checkpoints/best.pt",
                                                    dst_path=str(tmp_path / "run")))
    # the checkpoint inside is the run's best.pt, byte for byte, and its weights are the hash the run recorded
    inside = folder / "artifacts" / "best.pt"
    assert checkpoint.file_sha256(inside) == checkpoint.file_sha256(best)
    assert checkpoint.load(inside)["weights_sha256"] == run.data.tags["kdtrack.checkpoint_sha256"]
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert mlmodel["metadata"]["kdtrack"]["checkpoint_sha256"] == run.data.tags["kdtrack.checkpoint_sha256"]
    assert "python_model.pkl" not in {p.name for p in folder.rglob("*")}  # models from code: nothing pickled
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 8, 8]}}]
    assert json.loads(mlmodel["signature"]["outputs"]) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 10]}}]
    example = np.asarray(json.loads((folder / "input_example.json").read_text()), dtype=np.float32)
    np.testing.assert_array_equal(example, build_dataset(config.load(DIGITS).data).features[:2])  # raw rows
    # requirements: pinned to what is installed here, and never kdtrack (not on PyPI), whose code is inside
    assert (folder / "requirements.txt").read_text().split() == [
        f"{name}=={metadata.version(name).split('+')[0]}" for name in ("mlflow", "torch", "numpy", "PyYAML")]
    # kdtrack's code that loading imports (a fresh process proves it enough, below), not its tracking or stages
    shipped = {str(p.relative_to(folder / "code")) for p in (folder / "code").rglob("*") if p.is_file()}
    assert {"kdtrack/__init__.py", "kdtrack/mlflow_model.py", "kdtrack/models.py", "kdtrack/checkpoint.py"} <= shipped
    assert not shipped & {"kdtrack/tracking.py", "kdtrack/cli.py", "kdtrack/stages/__init__.py"}

    x = _raw_rows(50)
    predicted = mlflow.pyfunc.load_model(f"runs:/{digits_teacher}/model").predict(x)
    np.testing.assert_array_equal(predicted, _checkpoint_predicts(best, x))


def test_loading_refuses_a_model_whose_checkpoint_was_changed(digits_teacher: str, tmp_path: Path):
    folder = _model_dir(digits_teacher, tmp_path)
    inside = folder / "artifacts" / "best.pt"
    _changed_checkpoint(inside, inside)
    with pytest.raises(CheckpointError, match=r"has weights [0-9a-f]{12} but run .* recorded"):
        mlflow.pyfunc.load_model(str(folder))


def test_logging_refuses_a_checkpoint_the_run_did_not_record(digits_teacher: str, tmp_path: Path):
    best = Path(mlflow.artifacts.download_artifacts(run_id=digits_teacher, artifact_path="checkpoints/best.pt",
                                                    dst_path=str(tmp_path)))
    other = _changed_checkpoint(best, tmp_path / "other.pt")
    client = MlflowClient()
    before = len(client.search_logged_models(experiment_ids=[tracking.get_run(digits_teacher).info.experiment_id]))
    with pytest.raises(CheckpointError, match=f"but run {digits_teacher} recorded"):
        mlflow_model.log(digits_teacher, other, _raw_rows(2))
    assert len(client.search_logged_models(
        experiment_ids=[tracking.get_run(digits_teacher).info.experiment_id])) == before


def test_register_refuses_a_run_without_a_model(digits_teacher: str):
    cache = cache_logits.run(config.load(DIGITS, ["experiment=mlflow-models"]), digits_teacher)
    with pytest.raises(BadInput, match=f"run {cache} has no MLflow model"):
        mlflow_model.register(cache, "not-a-model")


@pytest.fixture(scope="module")
def registered_student(digits_teacher: str) -> str:
    """A KD student trained by the CLI with --register: its run id (version 1 of REGISTERED)."""
    cache_logits.run(config.load(DIGITS, ["experiment=mlflow-models"]), digits_teacher)
    code, out, err = cli("train-student", "--config", str(DIGITS), "--teacher-run-id", digits_teacher,
                         *set_args(*STUDENT), "--register", REGISTERED)
    assert code == 0, err
    assert f"as {REGISTERED!r} version 1" in err
    return out.strip()


@pytest.mark.slow  # a second Python process that imports mlflow and torch
def test_a_fresh_process_loads_the_student_by_run_and_by_registry_name(registered_student: str, tmp_path: Path):
    (version,) = MlflowClient().search_model_versions(f"name = '{REGISTERED}'")
    assert version.run_id == registered_student
    x = _raw_rows(64)
    np.save(tmp_path / "x.npy", x)
    uris = [f"runs:/{registered_student}/model", f"models:/{REGISTERED}/1"]
    proc = subprocess.run([sys.executable, "-c", LOADER, *uris], cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "/code/kdtrack/__init__.py" in proc.stdout  # the model's own copy of kdtrack's code, not the checkout's
    best = Path(mlflow.artifacts.download_artifacts(run_id=registered_student, artifact_path="checkpoints/best.pt",
                                                    dst_path=str(tmp_path / "run")))
    expected = _checkpoint_predicts(best, x)
    assert expected.shape == (64, 10)
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"y{i}.npy"), expected)


@pytest.mark.slow  # starts `mlflow models serve` (uvicorn) and waits for it
def test_mlflow_models_serve_answers_with_the_checkpoints_logits(registered_student: str, tmp_path: Path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    # as the README says: .venv/bin on PATH, since MLflow starts uvicorn by name
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED}/1",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
                            env=subprocess_env(OMP_NUM_THREADS="1"))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        x = _raw_rows(5)
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())["predictions"]
    finally:
        _stop_group(proc)
        log.close()
    best = Path(mlflow.artifacts.download_artifacts(run_id=registered_student, artifact_path="checkpoints/best.pt",
                                                    dst_path=str(tmp_path / "run")))
    np.testing.assert_array_equal(np.asarray(answer, dtype=np.float32), _checkpoint_predicts(best, x))


@pytest.mark.slow  # trains a teacher, a cache and a student
def test_pipeline_registers_its_first_student(tmp_path: Path):
    # a teacher of its own (model.hidden): pipeline steps are reused across experiments, and other tests' pipelines
    # must neither reuse this one's nor lend it theirs
    sets = [*TINY_TEACHER, "model.hidden=[24]", *STUDENT[:-1], "experiment=mlflow-models-pipeline"]
    code, out, err = cli("pipeline", "--config", str(DIGITS), "--students", "kd,none", *set_args(*sets),
                         "--register", "pipeline-student")
    assert code == 0, err
    (parent,) = tracking.select_runs(experiment="mlflow-models-pipeline", stage="pipeline")
    steps = json.loads(parent.data.tags["kdtrack.steps"])
    (version,) = MlflowClient().search_model_versions("name = 'pipeline-student'")
    assert version.run_id == steps["student-kd"][0]
    assert parent.data.tags["kdtrack.registered_model"] == "pipeline-student/1"
