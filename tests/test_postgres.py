"""Team tracking: kdtrack unchanged against `mlflow server` with a PostgreSQL backend store, over HTTP.

The PostgreSQL cluster is the session's (conftest `postgres`: a throwaway cluster, skipped with the install command
when PostgreSQL is missing); this module takes a database of its own in it and serves it with an `mlflow server`
that its fixture starts and stops.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS, PG_BIN, PG_INSTALL, Postgres, Server, mlflow_server, set_args, subprocess_env

# Starts an mlflow server on PostgreSQL and runs a pipeline and 8 students in processes of their own.
pytestmark = [pytest.mark.skipif(PG_BIN is None, reason=PG_INSTALL), pytest.mark.slow]

SMALL = ("model.name=mlp", "model.hidden=[32]", "optim.epochs=2", "student.model.hidden=[8]",
         "student.optim.epochs=2", "train.progress=off", "experiment=team-postgres")
STUDENTS = 8
# Logged once per epoch by every KD student (README, train-student).
EPOCH_KEYS = ("train/loss", "train/loss_ce", "train/loss_kd", "train/kd_weight", "train/coverage",
              "train/avg_confidence", "val/acc", "lr", "epoch_seconds", "data_seconds")


@pytest.fixture(scope="module")
def postgres_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mlflow server` over the database `team_postgres` of the session's PostgreSQL cluster; stopped at the end."""
    root = tmp_path_factory.mktemp("postgres-server")
    with mlflow_server(root, postgres.create_database("team_postgres")) as url:
        yield Server(url, root / "artifacts")


def _kdtrack(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdtrack", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1]


def test_pipeline_and_concurrent_students_on_postgres(postgres_server: Server, tmp_path: Path):
    sets = set_args(*SMALL)
    url = postgres_server.url
    env = subprocess_env(MLFLOW_TRACKING_URI=url, KDTRACK_CACHE_DIR=str(tmp_path / "kdcache"),
                         OMP_NUM_THREADS="1")
    client = MlflowClient(tracking_uri=url)
    parent = _finished(_kdtrack(["pipeline", "--config", str(DIGITS), "--students", "kd,none", *sets],
                                env, tmp_path))
    teacher = client.get_run(parent).data.tags["kdtrack.teacher_run_ids"]
    experiment = client.get_run(parent).info.experiment_id
    pipeline_runs = client.search_runs([experiment])
    assert sorted(r.data.tags["kdtrack.stage"] for r in pipeline_runs) == [
        "cache", "pipeline", "student", "student", "teacher"]
    assert {r.info.status for r in pipeline_runs} == {"FINISHED"}

    procs = [_kdtrack(["train-student", "--config", str(DIGITS), "--teacher-run-id", teacher, *sets,
                       "--set", f"seed={seed}"], env, tmp_path) for seed in range(STUDENTS)]
    try:
        students = [_finished(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()

    assert len(set(students)) == STUDENTS
    for run_id in students:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["seed"] in {str(s) for s in range(STUDENTS)}
        for key in EPOCH_KEYS:
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == [0, 1], (run_id, key)
        assert "test/acc" in run.data.metrics
    all_runs = client.search_runs([experiment], max_results=1000)
    assert len(all_runs) == len(pipeline_runs) + STUDENTS
    assert {r.info.status for r in all_runs} == {"FINISHED"}
    # The artifacts went through the server's proxy into its artifact root: a best.pt for the teacher, the two
    # pipeline students and each of the 8 students.
    best = [postgres_server.artifact_dir(r.info.run_id) / "checkpoints" / "best.pt" for r in all_runs]
    assert sum(path.is_file() for path in best) == 1 + 2 + STUDENTS
