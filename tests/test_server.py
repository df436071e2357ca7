"""train-teacher unchanged against a real `mlflow server` over HTTP: the session's shared server (conftest)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, Server, set_args, subprocess_env
from kdtrack import checkpoint

pytestmark = pytest.mark.slow  # a kdtrack process against a real mlflow server


def test_train_teacher_over_http(tracking_server: Server, tmp_path: Path):
    url = tracking_server.url
    env = subprocess_env(MLFLOW_TRACKING_URI=url, KDTRACK_CACHE_DIR=str(tmp_path / "kdcache"))
    args = set_args(*TINY_TEACHER, "experiment=over-http")
    proc = subprocess.run([sys.executable, "-m", "kdtrack", "train-teacher", "--config", str(DIGITS), *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout is the run id alone, as `RUN=$(kdtrack train-teacher ...)` needs; MLflow's links over HTTP go to stderr
    run_id = proc.stdout.strip()
    assert proc.stdout == f"{run_id}\n" and len(run_id) == 32, proc.stdout
    assert "View run teacher-" in proc.stderr and f"/runs/{run_id}" in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdtrack.stage"] == "teacher"
    assert len(client.get_metric_history(run_id, "val/acc")) == 2
    assert run.inputs.dataset_inputs[0].dataset.name == "digits/train+val+test"  # the teacher's view: every split
    best = client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    assert checkpoint.weights_sha256(checkpoint.load(best)["state_dict"]) == run.data.tags[
        "kdtrack.checkpoint_sha256"]
    # The artifacts went through the server's proxy into its own artifact root, not into a local ./mlruns.
    assert (tracking_server.artifact_dir(run_id) / "checkpoints" / "best.pt").is_file()
    assert not (tmp_path / "mlruns").exists()
