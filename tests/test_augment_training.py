"""Augmentation in training runs: replayed on resume, and cached clean-sample targets refused unless chosen."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, cli, interrupted_after_epoch, set_args
from kdtrack import config, tracking
from kdtrack.stages import train_teacher

IMAGE_OPS = "data.augment=[crop(padding=1), flip, noise(std=0.2), mixup(alpha=0.4)]"


@pytest.mark.slow  # trains a teacher straight and again with an interruption and a resume
def test_a_resumed_run_replays_the_same_augmentations(store: str) -> None:
    """Every draw is a function of (seed, epoch, row): the resumed run ends with the uninterrupted one's weights.
    Without augmentation the two would agree as well, so the same check also runs against a differently seeded
    augmentation, which must end elsewhere."""
    overrides = [*TINY_TEACHER, "optim.epochs=3", IMAGE_OPS, "experiment=augment-resume"]
    straight = train_teacher.run(config.load(DIGITS, overrides))
    with interrupted_after_epoch(0), pytest.raises(KeyboardInterrupt):
        train_teacher.run(config.load(DIGITS, overrides))
    client = MlflowClient()
    experiment = client.get_experiment_by_name("augment-resume").experiment_id
    (interrupted,) = client.search_runs([experiment], "attributes.status = 'KILLED'")
    code, _, err = cli("train-teacher", "--resume", interrupted.info.run_id)
    assert code == 0, err
    tag = "kdtrack.checkpoint_sha256_last"
    assert client.get_run(interrupted.info.run_id).data.tags[tag] == client.get_run(straight).data.tags[tag]
    plain = train_teacher.run(config.load(DIGITS, [*TINY_TEACHER, "optim.epochs=3", "experiment=augment-resume"]))
    assert client.get_run(plain).data.tags[tag] != client.get_run(straight).data.tags[tag]  # augmentation acted
    assert tracking.get_run(straight).data.params["data.augment"] == \
        "crop(padding=1),flip,noise(std=0.2),mixup(alpha=0.4)"


@pytest.mark.slow  # a cache and two students
def test_cached_clean_targets_for_an_augmenting_student_only_when_chosen(store: str, digits_teacher: str) -> None:
    base = ["student.optim.epochs=1", "train.progress=off", "experiment=augment-students"]
    args = ["train-student", "--config", str(DIGITS), "--teacher-run-id", digits_teacher, "--build-missing-cache"]
    code, out, err = cli(*args, *set_args(*base, "data.augment=[noise(std=0.1), mixup(alpha=0.2)]"))
    assert code == 2 and out == ""
    assert "data.augment (noise(std=0.1)) changes the inputs, but a logit cache holds the teacher's outputs of " \
           "the clean samples" in err and "kd.clean_targets=true" in err
    code, out, err = cli(*args, *set_args(*base, "data.augment=[noise(std=0.1)]", "kd.clean_targets=true"))
    assert code == 0, err
    assert tracking.get_run(out.strip()).data.tags["kdtrack.clean_targets"] == "true"
    code, out, err = cli(*args, *set_args(*base, "data.augment=[mixup(alpha=0.2)]"))  # targets mixed like inputs
    assert code == 0, err
    assert "kdtrack.clean_targets" not in tracking.get_run(out.strip()).data.tags
