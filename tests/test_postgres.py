"""Team tracking: kdtrack unchanged against `mlflow server` with a PostgreSQL backend store, over HTTP.

A throwaway PostgreSQL cluster is created and stopped here. PostgreSQL refuses to run as root, so as root its
binaries run as the `postgres` user (created when missing) through `runuser`.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS, free_port, mlflow_server, set_args, subprocess_env


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(n) for n in Path(p).parts[-3].split(".") if n.isdigit()])
    which = shutil.which("initdb")
    return Path(found[-1]).parent if found else Path(which).parent if which else None


PG_BIN = _pg_bin()
PG_USER = "postgres"
pytestmark = pytest.mark.skipif(
    PG_BIN is None, reason="PostgreSQL not installed (no initdb); install it with: apt-get install -y postgresql")

SMALL = ("model.name=mlp", "model.hidden=[32]", "optim.epochs=2", "student.model.hidden=[8]",
         "student.optim.epochs=2", "train.progress=off", "experiment=team-postgres")
STUDENTS = 8
# Logged once per epoch by every KD student (README, train-student).
EPOCH_KEYS = ("train/loss", "train/loss_ce", "train/loss_kd", "train/kd_weight", "train/coverage",
              "train/avg_confidence", "val/acc", "lr", "epoch_seconds", "data_seconds")


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL on 127.0.0.1 with an empty database `mlflow`; yields its SQLAlchemy URI."""
    if os.geteuid() == 0 and not _user_exists(PG_USER):
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    # Not under pytest's tmp_path: its root folder is private to the test's user, which PG_USER is not.
    root = Path(tempfile.mkdtemp(prefix="kdtrack-pg-"))
    data, log, port = root / "data", root / "postgres.log", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
    try:
        subprocess.run(_as_pg_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
                                    "--no-instructions"]), check=True, capture_output=True)
        subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-o",
                                    f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"]),
                       check=True, capture_output=True)
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True)
        # SQLAlchemy 2.1's plain postgresql:// means psycopg 3; the driver installed with kdtrack is psycopg2.
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop_postgres(data)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _stop_postgres(data: Path) -> None:
    """pg_ctl's fast shutdown; if that fails, the postmaster's whole process group is killed."""
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    stopped = subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]),
                             capture_output=True, timeout=60)
    if stopped.returncode != 0 and pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def _kdtrack(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdtrack", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1]


def test_pipeline_and_concurrent_students_on_postgres(tmp_path: Path):
    sets = set_args(*SMALL)
    with postgres() as backend_uri, mlflow_server(tmp_path, backend_uri) as url:
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
    # The artifacts went through the server's proxy into its artifact root.
    assert len(list((tmp_path / "artifacts").rglob("best.pt"))) >= 1 + 2 + STUDENTS
