"""`make server` / scripts/server.sh: PostgreSQL and `mlflow server` on 127.0.0.1 only, runs in PostgreSQL, stopped whole.

The script runs from a copy in a throwaway project folder (its state goes to `<project>/.server/`), on free ports. It
creates and starts its own PostgreSQL cluster and mlflow server, as `make server` does: that is what is tested, so this
test does not use the session's shared server or cluster. To be cheaper on a small machine, the script's mlflow server
runs with settings that `mlflow server` reads from the environment the script passes on: one worker process
(MLFLOW_WORKERS) instead of four, and no job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: seven Python processes
for GenAI jobs) — none of which the script sets or this test checks.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PG_BIN, PG_INSTALL, REPO, free_port, group_pids, subprocess_env

# Starts PostgreSQL and an mlflow server through the script.
pytestmark = [pytest.mark.skipif(PG_BIN is None, reason=PG_INSTALL), pytest.mark.slow]


def _listeners(port: int) -> list[str]:
    """Local addresses listening on TCP `port`, from `ss`."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list listening sockets")
def test_server_script_serves_on_localhost_from_postgres_and_stops_whole() -> None:
    # Not under pytest's tmp_path: PostgreSQL runs as another user when the tests run as root.
    project = Path(tempfile.mkdtemp(prefix="kdtrack-server-"))
    project.chmod(0o755)
    (project / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "server.sh", project / "scripts" / "server.sh")
    port, pg_port = free_port(), free_port()
    env = subprocess_env(KDTRACK_SERVER_PORT=str(port), KDTRACK_PG_PORT=str(pg_port),
                         MLFLOW=str(Path(sys.executable).parent / "mlflow"), MLFLOW_WORKERS="1",
                         MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")

    def script(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(project / "scripts" / "server.sh"), action], env=env, capture_output=True,
                              text=True, timeout=180, check=False)

    url = f"http://127.0.0.1:{port}"
    try:
        started = script("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export MLFLOW_TRACKING_URI={url}" in started.stdout
        assert _listeners(port) == ["127.0.0.1"] and _listeners(pg_port) == ["127.0.0.1"]
        MlflowClient(url).create_experiment("team-store")
        # The experiment is a row of PostgreSQL's `mlflow` database, reached with the script's password file.
        query = subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "mlflow", "-d",
                                "mlflow", "-tAc", "SELECT name FROM experiments ORDER BY name"],
                               env={**env, "PGPASSFILE": str(project / ".server" / "pgpass")},
                               capture_output=True, text=True, check=False)
        assert query.returncode == 0 and "team-store" in query.stdout.split(), query.stderr
        assert oct((project / ".server" / "pgpass").stat().st_mode & 0o777) == "0o600"
        pgid = int((project / ".server" / "mlflow.pid").read_text())
        assert len(group_pids(pgid)) >= 2  # `mlflow server` and the uvicorn server it started: stop must end both

        stopped = script("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert "mlflow server stopped" in stopped.stdout and "PostgreSQL stopped" in stopped.stdout
        assert group_pids(pgid) == [] and _listeners(port) == [] and _listeners(pg_port) == []
        assert script("status").stdout.splitlines() == ["PostgreSQL not running", "mlflow server not running"]
    finally:
        script("stop")
        shutil.rmtree(project, ignore_errors=True)
