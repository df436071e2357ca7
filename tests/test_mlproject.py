"""MLproject and the README's `mlflow run` lines: each names a real entry point and parameters, and each entry point
finds a Python with kdtrack's dependencies from a fresh shell (scripts/python.sh). The slow end-to-end run from a
fresh shell is tests/test_train_teacher.py::test_mlflow_run_entry_point."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

ENTRY_POINTS = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
PRINT_PYTHON = ["-c", "import os, sys; print(sys.executable, os.environ.get('MARK', ''))"]


def test_every_readme_mlflow_run_line_names_an_entry_point_and_its_parameters():
    lines = re.findall(r"([^\s`]*mlflow) run (\. .*?)(?:`|#|$)", (REPO / "README.md").read_text(), flags=re.M)
    assert len(lines) >= 6  # train_teacher (2), cache_logits, train_student, main, plot
    for exe, rest in lines:
        args = shlex.split(rest)
        # mlflow lives in .venv, which nothing activates; --env-manager local: conda need not be installed
        assert exe == ".venv/bin/mlflow", rest
        assert args[0] == "." and args[args.index("--env-manager") + 1] == "local", rest
        entry = ENTRY_POINTS[args[args.index("-e") + 1]]
        given = [args[i + 1].split("=")[0] for i, a in enumerate(args) if a == "-P"]
        assert set(given) <= set(entry["parameters"]), rest


def test_every_entry_point_runs_through_the_python_finder():
    for name, entry in ENTRY_POINTS.items():
        assert entry["command"].startswith("bash scripts/python.sh "), name


def _path_with(tmp: Path, python: str) -> dict[str, str]:
    """A PATH of one folder holding `python` (a shell script) and the tools the finder uses."""
    folder = tmp / "bin"
    folder.mkdir()
    (folder / "python").write_text(f"#!/bin/sh\n{python}\n")
    (folder / "python").chmod(0o755)
    for tool in ("dirname",):
        os.symlink(shutil.which(tool), folder / tool)
    return {"PATH": str(folder), "HOME": os.environ.get("HOME", "/")}


def _finder(env: dict[str, str], project: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/bash", str(project / "scripts" / "python.sh"), *PRINT_PYTHON], cwd=project,
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_python_without_mlflow_on_path_gives_way_to_the_projects_venv(tmp_path: Path):
    proc = _finder(_path_with(tmp_path, "exit 1"))  # as Debian's python3 in a fresh shell: no mlflow, no torch
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(REPO / ".venv" / "bin" / "python")]


def test_an_environment_python_with_mlflow_comes_first(tmp_path: Path):
    # as after `conda activate` or a virtualenv's activate script: its python has kdtrack's dependencies
    proc = _finder(_path_with(tmp_path, f'MARK=env exec {sys.executable} "$@"'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "env"


def test_no_usable_python_is_one_line_with_the_fix(tmp_path: Path):
    project = tmp_path / "clone"  # a checkout without .venv
    (project / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "python.sh", project / "scripts")
    proc = _finder(_path_with(tmp_path, "exit 1"), project)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no Python with kdtrack's dependencies") and "make install" in proc.stderr
