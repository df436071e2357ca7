"""One tracking store per test session: a real sqlite `mlflow.db` with its artifacts, in a temp folder."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "digits.yaml"
# A teacher small enough to train in a second or two: the MLP on digits.
TINY_TEACHER = ("model.name=mlp", "model.hidden=[32]", "optim.epochs=2", "optim.lr=0.05", "train.progress=off")


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
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts; stopped (whole process group) on exit."""
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{root / 'server.db'}"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, root / "server.log")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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

