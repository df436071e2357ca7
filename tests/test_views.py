"""View-consistent caches: K augmented views per sample, the student trains on the very view whose target it reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from conftest import DIGITS, cli, set_args
from kdtrack import augment, config, tracking
from kdtrack.data import dataset_digest, distillation_rows, student_dataset
from kdtrack.models import ModelSpec, build_model
from kdtrack.stages import cache_logits
from kdtrack.stages.distillation import build_distillation
from kdtrack.teachers import load_teacher

OPS = "data.augment=[crop(padding=1), flip, noise(std=0.3), mixup(alpha=0.4)]"
VIEWS = [OPS, "cache.views=3", "cache.view_seed=11", "experiment=views", "train.progress=off"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def views_cache(store: str, digits_teacher: str) -> str:
    return cache_logits.run(config.load(DIGITS, VIEWS), digits_teacher)


def _group(run_id: str) -> zarr.Group:
    return zarr.open_group(tracking.artifact_path(run_id, cache_logits.ARTIFACT), mode="r")


def test_a_views_cache_holds_the_teacher_on_each_regenerated_view(views_cache: str, digits_teacher: str) -> None:
    group = _group(views_cache)
    teacher = load_teacher(digits_teacher, CPU)
    rows = cache_logits.cache_rows(config.load(DIGITS, VIEWS), teacher)
    logits = np.asarray(group["logits"][:])
    assert logits.shape == (len(rows), 3, 10)
    assert group["logits"].metadata.dimension_names == ("row", "view", "class")
    assert group.attrs["views"] == {"count": 3, "seed": 11, "ops": ["crop(padding=1)", "flip", "noise(std=0.3)"]}
    assert group.attrs["num_classes"] == 10
    picked = torch.tensor([0, 5, 17, len(rows) - 1])
    x = rows.batch(picked)[0]
    for view in range(3):
        # the view by hand: the per-sample ops drawn with (view seed, view, store row), no mixup (a batch op)
        seen, _ = augment.Augmenter(augment.parse(["crop(padding=1)", "flip", "noise(std=0.3)"]), 11)(x, picked, view)
        assert not torch.equal(seen, x)
        with torch.no_grad():
            expected = teacher.model(seen).numpy()
        np.testing.assert_allclose(logits[picked.numpy(), view], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, 0], logits[:, 1])  # the views differ
    tags = tracking.get_run(views_cache).data.tags
    clean = cache_logits.plan_for(config.load(DIGITS, ["experiment=views"]), teacher, rows, CPU).key
    assert tags["kdtrack.cache_key"] != clean  # the views are part of the key


def test_the_student_reads_the_target_of_the_exact_input_it_trains_on(views_cache: str, digits_teacher: str) -> None:
    """The mean KL between the target a student uses and the teacher's output on the student's actual input is 0
    for a views cache, and not for clean-sample targets under augmentation. (With mixup on top, the target is the
    mix of the two samples' targets, which a nonlinear teacher's output on the mixed input is not: the views keep
    the per-sample part exact.)"""
    teacher = load_teacher(digits_teacher, CPU)

    def kl_of_used_targets(overrides: list[str]) -> float:
        cfg = config.load(DIGITS, overrides)
        data = student_dataset(cfg.data)
        train = distillation_rows(data, cfg.cache.splits).with_normalisation(teacher.normalisation)
        student = build_model(ModelSpec("mlp", 10, (1, 8, 8), {"hidden": (8,), "dropout": 0.0}))
        distill = build_distillation(cfg, [teacher], student, train, dataset_digest(train), CPU,
                                     build_missing_cache=True)
        used = []
        inner = distill.loss.teacher_logits_fn
        distill.loss.teacher_logits_fn = lambda b: used.append((b[0], inner(b), b)) or used[-1][1]
        rows = torch.arange(0, 64)
        batch = train.batch(rows)
        distill.training_loss(student, batch, 3)
        x, target, batch_seen = used[0]
        assert batch_seen[4] is None  # no mixup here
        with torch.no_grad():
            live = teacher.model(x)
        t = distill.loss.config.temperature
        p, log_p = torch.softmax(target / t, dim=1), torch.log_softmax(target / t, dim=1)
        return float((p * (log_p - torch.log_softmax(live / t, dim=1))).sum(dim=1).mean())

    per_sample = "data.augment=[crop(padding=1), flip, noise(std=0.3)]"
    assert kl_of_used_targets([per_sample, *VIEWS[1:]]) < 1e-6
    assert kl_of_used_targets([per_sample, "kd.clean_targets=true", "experiment=views", "train.progress=off"]) > 1e-3


@pytest.mark.slow  # verification re-runs the teacher on views; a student trains
def test_views_are_verified_by_replay_and_a_student_trains_on_them(views_cache: str, digits_teacher: str) -> None:
    code, out, err = cli("verify-cache", "--run-id", views_cache, "--recompute", "16")
    assert code == 0, err
    assert "fidelity" in out
    code, out, err = cli("train-student", "--config", str(DIGITS), "--teacher-run-id", digits_teacher,
                         *set_args(*VIEWS, "student.optim.epochs=1"))
    assert code == 0, err
    student = tracking.get_run(out.strip())
    assert student.data.tags["kdtrack.cache_run_ids"] == views_cache
    assert student.data.tags["kdtrack.cache_views"] == "3"
    assert "kdtrack.clean_targets" not in student.data.tags


def test_views_need_per_sample_ops() -> None:
    from kdtrack.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cache.views=2 needs per-sample ops in data.augment \(got \['mixup"):
        augment.cache_views(["mixup(alpha=0.2)"], 2, 0)
    assert augment.cache_views(["flip"], 0, 0) is None


def test_a_student_regenerates_views_by_store_row_and_draws_one_per_sample_and_epoch() -> None:
    views = augment.Views(4, 11, augment.parse(["noise(std=1)"]))
    seen = []
    loss = augment.ViewAugmented(lambda model, batch, epoch: seen.append(batch) or (None, {}), views, [], seed=3,
                                 cache_rows=lambda rows: rows + 100)  # the store holds these rows further down
    x, rows = torch.zeros(64, 5), torch.arange(64)
    loss(None, (x, torch.zeros(64), rows, torch.zeros(64)), 2)
    batch = seen[0]
    view = batch[5]
    assert torch.equal(view, augment.choose_views(3, 2, rows, 4)) and set(view.tolist()) == {0, 1, 2, 3}
    assert torch.equal(batch[0], views.regenerate(x, rows + 100, view))
    loss(None, (x, torch.zeros(64), rows, torch.zeros(64)), 3)
    assert not torch.equal(seen[1][5], view)  # another epoch, other views
