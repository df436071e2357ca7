"""The train-teacher stage end to end against the session's sqlite store: CLI, mlflow run, failure, resume."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import DIGITS, REPO, TINY_TEACHER, cli, interrupted_after_epoch, set_args
from kdtrack import checkpoint, config, engine
from kdtrack.data import build_dataset, dataset_digest, make_loader
from kdtrack.models import ModelSpec, build_model
from kdtrack.stages import train_teacher


def _git_head() -> str:
    """The commit the code runs from, read here with git itself; `unknown` outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def teacher_run(store: str) -> str:
    code, out, err = cli("train-teacher", "--config", str(DIGITS), *set_args(*TINY_TEACHER, "experiment=teachers"))
    assert code == 0, err
    return out.strip().splitlines()[-1]


def test_cli_run_is_finished_with_tags_params_and_metrics(teacher_run: str):
    run = MlflowClient().get_run(teacher_run)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "teacher-mlp-digits"
    tags = run.data.tags
    assert tags["kdtrack.stage"] == "teacher"
    # the full commit, then the hash of the uncommitted diff if there is one
    assert re.fullmatch(rf"{_git_head()}(-dirty\.[0-9a-f]{{12}})?", tags["kdtrack.code_version"])
    assert tags["mlflow.note.content"].startswith("Teacher mlp on digits")
    params = run.data.params
    assert params["optim.epochs"] == "2" and params["model.name"] == "mlp" and params["model.hidden"] == "32"
    history = {key: [(m.step, m.value) for m in sorted(MlflowClient().get_metric_history(teacher_run, key),
                                                       key=lambda m: m.step)]
               for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_seconds", "data_seconds")}
    for key, values in history.items():
        assert [step for step, _ in values] == [0, 1], key
    # cosine over 2 epochs from lr=0.05: 0.05, then 0.05 * (1 + cos(pi / 2)) / 2
    assert [v for _, v in history["lr"]] == pytest.approx([0.05, 0.025])
    val_acc = [v for _, v in history["val/acc"]]
    assert run.data.metrics["best/val_acc"] == max(val_acc)
    assert run.data.metrics["best/epoch"] == val_acc.index(max(val_acc))  # the first epoch that reached it
    assert run.data.metrics["test/acc"] > 0.8  # two epochs of an MLP on digits are well above chance (0.1)


def test_resolved_config_is_an_artifact(teacher_run: str, tmp_path: Path):
    path = MlflowClient().download_artifacts(teacher_run, "config.yaml", str(tmp_path))
    cfg = config.load(path)
    assert cfg == config.load(DIGITS, [*TINY_TEACHER, "experiment=teachers"])


def test_dataset_input_carries_the_digest(teacher_run: str):
    run = MlflowClient().get_run(teacher_run)
    digest = dataset_digest(build_dataset(config.load(DIGITS).data))
    assert run.data.tags["kdtrack.dataset_digest"] == digest
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits/train+val+test"  # every split, all labels: the teacher's view
    # MLflow's digest column is short: a prefix of kdtrack's digest, at least as long as messages quote it
    assert len(dataset_input.dataset.digest) >= 12 and digest.startswith(dataset_input.dataset.digest)
    assert digest in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"


def test_checkpoints_load_and_reproduce_the_logged_accuracy(teacher_run: str, tmp_path: Path):
    client = MlflowClient()
    names = sorted(f.path for f in client.list_artifacts(teacher_run, "checkpoints"))
    assert names == ["checkpoints/best.pt", "checkpoints/last.pt"]
    best = checkpoint.load(client.download_artifacts(teacher_run, "checkpoints/best.pt", str(tmp_path)))
    last = checkpoint.load(client.download_artifacts(teacher_run, "checkpoints/last.pt", str(tmp_path)))
    run = client.get_run(teacher_run)
    # (checkpoint.weights_sha256 is pinned to a hand-written sha256 in test_checkpoint.py)
    assert checkpoint.weights_sha256(best["state_dict"]) == run.data.tags["kdtrack.checkpoint_sha256"]
    assert checkpoint.weights_sha256(last["state_dict"]) == run.data.tags["kdtrack.checkpoint_sha256_last"]
    assert last["epoch"] == 1 and best["epoch"] == run.data.metrics["best/epoch"]
    model = build_model(ModelSpec.from_dict(best["spec"]))
    model.load_state_dict(best["state_dict"])
    cfg = config.load(DIGITS)
    from kdtrack.data import Normalisation

    test = build_dataset(cfg.data).select(["test"]).with_normalisation(Normalisation.from_dict(best["normalisation"]))
    result = engine.evaluate(model, make_loader(test, 256, shuffle=False, seed=0), device=torch.device("cpu"))
    assert result["acc"] == pytest.approx(run.data.metrics["test/acc"], abs=1e-9)


def test_a_failing_run_ends_failed_with_one_line(store: str):
    # lr=1e30 blows the weights up after one step: the loss turns non-finite and training must stop.
    code, _out, err = cli("train-teacher", "--config", str(DIGITS),
                           *set_args(*TINY_TEACHER, "optim.lr=1e30", "experiment=failing"))
    assert code == 1
    assert err.startswith("error: non-finite loss at epoch 0, step 1") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    exp = MlflowClient().get_experiment_by_name("failing")
    (run,) = MlflowClient().search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"


def test_bad_input_exits_2_without_a_run(store: str):
    code, _out, err = cli("train-teacher", "--set", "optim.epocs=3", "--set", "experiment=never-created")
    assert code == 2
    assert err.strip() == ("error: unknown config key optim.epocs — valid keys at optim: name, lr, momentum, "
                           "weight_decay, nesterov, epochs, schedule, step_size, gamma")
    assert MlflowClient().get_experiment_by_name("never-created") is None


@pytest.mark.slow  # trains a teacher straight and again with a crash and resume, per case (~1 s each)
@pytest.mark.parametrize("crash", ["after last.pt", "between metrics and last.pt"])
def test_resume_continues_the_same_run_to_the_same_weights(store: str, crash: str, monkeypatch):
    experiment = f"resume-{crash.split()[0]}"
    overrides = [*TINY_TEACHER, "optim.epochs=4", "model.dropout=0.2", f"experiment={experiment}"]
    straight = train_teacher.run(config.load(DIGITS, overrides))

    if crash == "after last.pt":
        with interrupted_after_epoch(1), pytest.raises(KeyboardInterrupt):
            train_teacher.run(config.load(DIGITS, overrides))
    else:  # epoch 1's metrics are logged, its last.pt never written: the resumed run repeats epoch 1
        save = checkpoint.save

        def crash_at_epoch_one(path, payload):
            if payload["epoch"] == 1:
                raise KeyboardInterrupt
            return save(path, payload)

        monkeypatch.setattr(checkpoint, "save", crash_at_epoch_one)
        with pytest.raises(KeyboardInterrupt):
            train_teacher.run(config.load(DIGITS, overrides))
        monkeypatch.setattr(checkpoint, "save", save)
    client = MlflowClient()
    (interrupted,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                        "attributes.status = 'KILLED'")

    code, out, err = cli("train-teacher", "--resume", interrupted.info.run_id)
    assert code == 0, err
    assert out.strip() == interrupted.info.run_id
    resumed = client.get_run(interrupted.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")] == [0, 1, 2, 3]
    tag = "kdtrack.checkpoint_sha256_last"
    assert resumed.data.tags[tag] == client.get_run(straight).data.tags[tag]


def fresh_shell_env() -> dict[str, str]:
    """A new shell's environment after the README's set-up step: nothing activated, so PATH has no .venv/bin (and no
    VIRTUAL_ENV); only the tracking store and kdtrack's cache folder are this session's."""
    venv_bin = (REPO / ".venv" / "bin").resolve()
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR", "MLFLOW_TRACKING_URI", "KDTRACK_CACHE_DIR")
            if k in os.environ}
    return {**keep, "PATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # `mlflow run`: a process that imports mlflow, then kdtrack in another
def test_mlflow_run_entry_point(store: str, tmp_path: Path):
    """As the README writes it, from a fresh shell in the project folder: `.venv/bin/mlflow run . -e train_teacher
    ... --env-manager local`, with no .venv/bin on PATH (the entry point's command finds the .venv's Python)."""
    if Path(sys.executable).parent.resolve() != (REPO / ".venv" / "bin").resolve():
        pytest.skip("runs the project's .venv/bin/mlflow; run the tests with .venv/bin/python (make test)")
    client = MlflowClient()  # the experiment's artifacts go to tmp_path, not into the project folder
    client.create_experiment("mlflow-run", artifact_location=(tmp_path / "artifacts").as_uri())
    overrides = " ".join([*TINY_TEACHER, "optim.epochs=1"])
    proc = subprocess.run(
        [".venv/bin/mlflow", "run", ".", "-e", "train_teacher", "--env-manager", "local",
         "--experiment-name", "mlflow-run", "-P", "config=experiments/digits.yaml", "-P", f"overrides={overrides}"],
        env=fresh_shell_env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("mlflow-run").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdtrack.stage"] == "teacher"
    assert run.data.params["optim.epochs"] == "1"
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")) == [
        "checkpoints/best.pt", "checkpoints/last.pt"]
    # every word of the `overrides` parameter reached the config, in order
    logged = config.load(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert logged == config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=1"])


@pytest.mark.slow  # trains several models end to end in process (1-4 s on 2 cores)
def test_resume_in_a_process_that_used_another_experiment(store: str):
    overrides = [*TINY_TEACHER, "optim.epochs=3"]
    with interrupted_after_epoch(0), pytest.raises(KeyboardInterrupt):
        train_teacher.run(config.load(DIGITS, [*overrides, "experiment=resume-elsewhere-a"]))
    client = MlflowClient()
    (interrupted,) = client.search_runs([client.get_experiment_by_name("resume-elsewhere-a").experiment_id])
    train_teacher.run(config.load(DIGITS, [*overrides, "optim.epochs=1", "experiment=resume-elsewhere-b"]))

    resumed = train_teacher.run(config.load(DIGITS, [*overrides, "experiment=resume-elsewhere-a"]),
                                resume_run_id=interrupted.info.run_id)
    assert resumed == interrupted.info.run_id
    run = client.get_run(resumed)
    assert run.info.status == "FINISHED"
    # the run stays in its own experiment, and the other experiment holds only its own run
    assert run.info.experiment_id == client.get_experiment_by_name("resume-elsewhere-a").experiment_id
    assert len(client.search_runs([client.get_experiment_by_name("resume-elsewhere-b").experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(resumed, "train/loss")] == [0, 1, 2]
