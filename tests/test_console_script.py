"""The `kdtrack` console script itself (the entry point pip installed next to this Python), run as a user runs it:
its exit codes, and what it prints on stdout and stderr."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, set_args, subprocess_env
from kdtrack import __version__

KDTRACK = Path(sys.executable).parent / "kdtrack"


def kdtrack(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`kdtrack ARGS` as its own process, through the console script (not `python -m kdtrack`)."""
    return subprocess.run([str(KDTRACK), *args], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_console_script_is_installed_and_calls_kdtrack_cli_main():
    assert KDTRACK.is_file(), f"{KDTRACK} missing: install kdtrack (make install) into this environment"
    script = KDTRACK.read_text()
    assert script.startswith("#!") and "from kdtrack.cli import main" in script


def test_version(tmp_path: Path):
    proc = kdtrack("--version", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"kdtrack, version {__version__}\n", "")


@pytest.mark.slow  # the command imports torch and mlflow before it reads the config (~4 s)
def test_a_bad_value_exits_2_with_one_line_and_touches_no_store(tmp_path: Path):
    store = tmp_path / "mlflow.db"
    proc = kdtrack("train-teacher", "--config", str(DIGITS), "--set", "optim.epochs=zero", cwd=tmp_path,
                   MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == "error: optim.epochs must be int, got str 'zero' — e.g. --set optim.epochs=3\n"
    assert not store.exists() and not (tmp_path / "mlruns").exists()


def test_an_unknown_command_is_a_usage_error(tmp_path: Path):
    proc = kdtrack("train-techer", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "No such command 'train-techer'" in proc.stderr


@pytest.mark.slow  # trains a tiny teacher in a process that imports torch and mlflow (~10 s on 2 cores)
def test_train_teacher_prints_the_id_of_a_finished_run_in_the_store(tmp_path: Path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = kdtrack("train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER, "experiment=console-script"),
                   cwd=tmp_path, MLFLOW_TRACKING_URI=store, KDTRACK_CACHE_DIR=str(tmp_path / "kdcache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_id,) = proc.stdout.split()  # stdout holds the run id and nothing else
    run = MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kdtrack.stage"] == "teacher"
    assert MlflowClient(tracking_uri=store).get_experiment(run.info.experiment_id).name == "console-script"
    assert (tmp_path / "mlruns").is_dir()  # the artifacts of the local store, next to it in the working folder


def test_stdout_holds_the_result_alone_and_everything_else_goes_to_stderr(capsys):
    """What a library prints on stdout while a command runs (MLflow's "View run" links over HTTP) is moved to
    stderr; the command's result lines stay on stdout, in order; outside a command `result` prints to stdout."""
    from kdtrack import output

    with output.results_only():
        print("🏃 View run teacher at: http://127.0.0.1:5000/#/experiments/1/runs/abc")
        output.result("abc")
        sys.stdout.write("🧪 View experiment at: http://127.0.0.1:5000/#/experiments/1\n")
        output.result("table line")
    output.result("after")
    captured = capsys.readouterr()
    assert captured.out == "abc\ntable line\nafter\n"
    assert captured.err == ("🏃 View run teacher at: http://127.0.0.1:5000/#/experiments/1/runs/abc\n"
                            "🧪 View experiment at: http://127.0.0.1:5000/#/experiments/1\n")
