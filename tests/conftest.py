"""One tracking store per test session: a real sqlite `mlflow.db` with its artifacts, in a temp folder."""
from __future__ import annotations

import contextlib
import gc
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "digits.yaml"
# A teacher small enough to train in a second or two: the MLP on digits.
TINY_TEACHER = ("model.name=mlp", "model.hidden=[32]", "optim.epochs=2", "optim.lr=0.05", "train.progress=off")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The process exits next. Python's last collections at exit walk every object torch, mlflow and the tests left
    (some 400,000): seconds per process, which an xdist worker makes its controller wait for. Frozen, they are
    skipped; nothing here relies on a finalizer at exit."""
    gc.freeze()


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """MLFLOW_TRACKING_URI of the session's sqlite store; the working directory holds its ./mlruns."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "KDTRACK_CACHE_DIR")}
    old_cwd = os.getcwd()
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["KDTRACK_CACHE_DIR"] = str(root / "kdtrack-cache")  # claims and downloads, never in the real home
    yield uri
    os.chdir(old_cwd)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child process, less the experiment/run that in-process MLflow calls export."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def cli(*args: str) -> tuple[int, str, str]:
    """`kdtrack ARGS` in this process: exit code, stdout, stderr."""
    from click.testing import CliRunner

    from kdtrack.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def set_args(*items: str) -> list[str]:
    """`--set KEY=VALUE` for each item."""
    return [arg for item in items for arg in ("--set", item)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, backend_uri: str | None = None):
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts (in `root/artifacts`), serving `backend_uri` (default:
    a sqlite file in `root`); stopped (whole process group) on exit."""
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{root / 'server.db'}"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root, env=server_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, root / "server.log")
        yield url
    finally:
        _stop_group(proc)
        log.close()


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a test's `mlflow server`: without MLflow's job runner (seven more Python processes, for
    GenAI jobs kdtrack never submits), which would cost a small machine more than the server itself."""
    return subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group `proc` leads (a server and its workers), SIGKILL to what is left after 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    # Workers may outlive the leader: the group is gone only when nothing in it is left.
    deadline = time.monotonic() + 20
    while group_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def group_pids(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid`, from /proc; zombies (dead, not yet reaped) left out."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):  # the process has just gone
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@dataclass(frozen=True)
class Server:
    """A running `mlflow server`: its URL and the folder its proxied artifacts are written to."""

    url: str
    artifacts: Path

    def artifact_dir(self, run_id: str) -> Path:
        """Where the server keeps the artifacts of `run_id` (its artifact URI is `mlflow-artifacts:/<exp>/<run>/...`)."""
        from mlflow.tracking import MlflowClient

        uri = MlflowClient(tracking_uri=self.url).get_run(run_id).info.artifact_uri
        assert uri.startswith("mlflow-artifacts:/"), uri
        return self.artifacts / uri.removeprefix("mlflow-artifacts:/").lstrip("/")


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """ONE `mlflow server` (sqlite backend, proxied artifacts, 127.0.0.1) for the whole session, started when a test
    first asks for it and stopped with its process group at the end. Tests share it, so each uses an experiment name
    of its own and never counts another test's runs."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(root) as url:
        yield Server(url, root / "artifacts")


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session", autouse=True)
def one_thread_everywhere() -> Iterator[None]:
    """Every model here is tiny: on 2 cores a second intra-op thread only adds spin-waits (2-3x slower on a busy CPU).
    Child processes inherit OMP_NUM_THREADS=1, so what a child computes matches what this process computes."""
    import torch  # here, not at the top: pytest-xdist's controller loads this file and runs no test

    saved = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved[1])
    if saved[0] is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved[0]


@pytest.fixture(autouse=True)
def mlflow_store_follows_the_environment() -> Iterator[None]:
    """mlflow.set_tracking_uri, which tracking.configure() calls, is global to the process: a test that points
    MLFLOW_TRACKING_URI at another store (monkeypatched, so put back afterwards) would leave mlflow's default store
    there for the next test's MlflowClient(). After each test mlflow follows the environment again. (Runs after
    monkeypatch's undo: autouse fixtures are set up first, so torn down last.)"""
    import mlflow

    yield
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))  # None: unset, mlflow's own default


@pytest.fixture(scope="session")
def digits_teacher(store: str) -> str:
    """Run id of a tiny FINISHED teacher (MLP on digits), shared by the cache and student tests."""
    from kdtrack import config
    from kdtrack.stages import train_teacher

    return train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "experiment=fixtures"]))


@contextlib.contextmanager
def interrupted_after_epoch(epoch: int):
    """Training raises KeyboardInterrupt (a Ctrl-C) right after `epoch` is checkpointed, inside this block."""
    from kdtrack.stages import training

    original = training.Saver.on_epoch_end

    def interrupt(self, current: int, metrics: dict) -> None:
        original(self, current, metrics)
        if current == epoch:
            raise KeyboardInterrupt

    training.Saver.on_epoch_end = interrupt
    try:
        yield
    finally:
        training.Saver.on_epoch_end = original


# ---------------------------------------------------------------- PostgreSQL

PG_INSTALL = "PostgreSQL not installed (no initdb); install it with: apt-get install -y postgresql"
PG_USER = "postgres"  # PostgreSQL refuses to run as root: as root its binaries run as this user, through runuser


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(n) for n in Path(p).parts[-3].split(".") if n.isdigit()])
    which = shutil.which("initdb")
    return Path(found[-1]).parent if found else Path(which).parent if which else None


PG_BIN = _pg_bin()


def as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth for the superuser `mlflow`)."""

    port: int

    def create_database(self, name: str) -> str:
        """A new empty database `name`; its SQLAlchemy URI. Tests sharing the cluster each take a database of their own."""
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", name],
                       check=True, capture_output=True)
        # SQLAlchemy 2.1's plain postgresql:// means psycopg 3; the driver installed with kdtrack is psycopg2.
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """ONE PostgreSQL cluster per session (initdb + pg_ctl into a temp folder), stopped and removed at the end;
    the tests that use it skip, naming the install command, when PostgreSQL is not installed."""
    if PG_BIN is None:
        pytest.skip(PG_INSTALL)
    if os.geteuid() == 0 and not _user_exists(PG_USER):
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    # Not under pytest's tmp_path: its root folder is private to the test's user, which PG_USER is not.
    root = Path(tempfile.mkdtemp(prefix="kdtrack-pg-"))
    data, log, port = root / "data", root / "postgres.log", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
    try:
        subprocess.run(as_pg_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust",
                                   "--no-instructions"]), check=True, capture_output=True)
        subprocess.run(as_pg_user([str(PG_BIN / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-o",
                                   f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"]),
                       check=True, capture_output=True)
        yield Postgres(port)
    finally:
        _stop_postgres(data)
        shutil.rmtree(root, ignore_errors=True)


def _stop_postgres(data: Path) -> None:
    """pg_ctl's fast shutdown; if that fails, the postmaster's whole process group is killed."""
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    stopped = subprocess.run(as_pg_user([str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]),
                             capture_output=True, timeout=60)
    if stopped.returncode != 0 and pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text().split()[0]), signal.SIGKILL)
