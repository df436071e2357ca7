"""kdtrack/stages/distillation.py pinned by value, in process and fast: the loss each method builds and its settings,
the teacher outputs it serves (live forwards by hand, cached rows read with plain zarr), which cache it picks or
refuses, and the Factor Transfer paraphraser it trains, stores on the teacher run and reuses (key by hashlib)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER
from kdtrack import config, engine, tracking
from kdtrack.data import IndexedDataset, Normalisation, dataset_digest, distillation_rows, make_loader, student_dataset
from kdtrack.errors import BadInput, CacheError, CacheNotFound, CheckpointError
from kdtrack.losses import FeatureKD, build_feature_method, train_paraphraser
from kdtrack.losses.kd import KDLossConfig, LogitKD
from kdtrack.models import build_model, spec_from_config
from kdtrack.stages import cache_logits, train_teacher
from kdtrack.stages.distillation import (CacheRef, _domain_index, _prepare_paraphraser, _same_inputs,
                                         build_distillation, pinned_cache, resolve_cache)
from kdtrack.teachers import Teacher, load_teacher

CPU = torch.device("cpu")
EXPERIMENT = "experiment=distillation-units"
# A conv teacher (block3 is its last conv stage, 8 x 1 x 1 on digits) that trains in a fraction of a second.
CNN = ("model.name=cnn", "model.channels=2", "optim.epochs=1")
FT = ("method=ft", "teacher_mode=online", "student.model.name=cnn", "student.model.channels=2",
      "kd.paraphraser_epochs=1", "kd.alpha=0.3")


def _cfg(*sets: str) -> config.Config:
    return config.load(DIGITS, [EXPERIMENT, "train.progress=off", *sets])


def _rows(cfg: config.Config) -> IndexedDataset:
    """The raw training rows train-student hands build_distillation for a distilling method."""
    return distillation_rows(student_dataset(cfg.data), cfg.cache.splits)


def _student(cfg: config.Config, seed: int = 0) -> torch.nn.Module:
    """The student model of cfg, and the global RNG seeded for the connectors built after it."""
    torch.manual_seed(seed)
    return build_model(spec_from_config(cfg.student.model, 10, (1, 8, 8), prefix="student.model"))


def _tags(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.tags


def _zarr_logits(cache_run: str, sample_ids: list[str]) -> np.ndarray:
    """The cached logits of `sample_ids`, read with plain zarr and matched by sample id."""
    group = zarr.open_group(str(tracking.local_artifact_dir(cache_run) / "logits.zarr"), mode="r")
    where = {sid: i for i, sid in enumerate(group["sample_ids"][:])}
    return np.asarray(group["logits"][:], dtype=np.float64)[[where[s] for s in sample_ids]]


def _complete_caches_of(teacher_run_id: str) -> int:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = (f"tags.`kdtrack.stage` = 'cache' AND tags.`kdtrack.teacher_run_id` = '{teacher_run_id}' "
             "AND tags.`kdtrack.complete` = 'true' AND attributes.status = 'FINISHED'")
    return len(client.search_runs(experiments, query, max_results=1000))


def _paraphraser_key(teacher: Teacher, digest: str, seed: int) -> str:
    """16 hex of sha256 over [weights, layer block3, rate 0.5, paraphraser_epochs 1, digest, seed] as JSON."""
    payload = json.dumps([teacher.checkpoint_sha256, "block3", 0.5, 1, digest, seed]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _ft_method(teacher: Teacher, seed: int) -> torch.nn.Module:
    """A fresh FT method (an untrained paraphraser of seeded random weights) for a cnn student."""
    cfg = _cfg(*FT)
    torch.manual_seed(seed)
    student = build_model(spec_from_config(cfg.student.model, 10, (1, 8, 8), prefix="student.model"))
    return build_feature_method("ft", student, teacher.model, (1, 8, 8))


def _small_rows(cfg: config.Config) -> IndexedDataset:
    return _rows(cfg).take(np.arange(150))  # three batches of 64, 64, 22


def _artifact(teacher_run_id: str, key: str) -> Path:
    return tracking.local_artifact_dir(teacher_run_id) / "paraphrasers" / f"{key}.pt"


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teachers(digits_teacher: str) -> dict[str, str]:
    """`cached` and `twin`: two runs of one config (equal weights, so equal cache keys); caches are built only for
    `cached`, paraphrasers only on `twin`. `digits`: the session's MLP teacher."""
    cfg = _cfg(*TINY_TEACHER, *CNN)
    return {"cached": train_teacher.run(cfg), "twin": train_teacher.run(cfg), "digits": digits_teacher}


@pytest.fixture(scope="module")
def caches(teachers: dict[str, str]) -> dict[str, str]:
    """Caches of `cached`, oldest first: two good float32 ones, a newer float32 one whose store says incomplete
    (its run still says complete), then a float16 one (another key); and a new float32 cache of `digits`."""
    cfg32, cfg16 = _cfg(), _cfg("cache.dtype=float16")
    older = cache_logits.run(cfg32, teachers["cached"])
    middle = cache_logits.run(cfg32, teachers["cached"], force=True)
    broken = cache_logits.run(cfg32, teachers["cached"], force=True)
    zarr.open_group(str(tracking.local_artifact_dir(broken) / "logits.zarr"), mode="r+").attrs["complete"] = False
    half = cache_logits.run(cfg16, teachers["cached"])
    return {"older": older, "middle": middle, "broken": broken, "half": half,
            "digits": cache_logits.run(cfg32, teachers["digits"], force=True)}  # ours, whatever others did


# ------------------------------------------------------------------------------------------- method none and kd

def test_method_none_is_plain_ce_with_the_configured_label_smoothing():
    cfg = _cfg("method=none", "train.label_smoothing=0.2")
    train = student_dataset(cfg.data).select(["train"])
    distill = build_distillation(cfg, [], _student(cfg), train, dataset_digest(train), CPU)
    assert type(distill.loss) is engine.SupervisedLoss and distill.loss.label_smoothing == 0.2
    assert (distill.modules, distill.caches, distill.tags) == ({}, [], {})


def test_kd_passes_every_kd_setting_through_and_never_smooths_labels(teachers: dict[str, str]):
    cfg = _cfg("teacher_mode=online", "train.label_smoothing=0.2", "kd.temperature=3", "kd.alpha=0.4",
               "kd.loss_type=soft_ce", "kd.weighting=threshold", "kd.confidence_threshold=0.3",
               "kd.warmup_epochs=2", "kd.ramp_epochs=3", "kd.regression=mse", "kd.domain=default")
    train = _rows(cfg)
    distill = build_distillation(cfg, [load_teacher(teachers["cached"], CPU)], _student(cfg), train,
                                 dataset_digest(train), CPU)
    assert type(distill.loss) is LogitKD
    assert distill.loss.config == KDLossConfig(temperature=3.0, kd_alpha=0.4, loss_type="soft_ce",
                                               kd_weighting="threshold", confidence_threshold=0.3, warmup_epochs=2,
                                               kd_ramp_epochs=3, regression="mse", label_smoothing=0.0)
    assert distill.loss.domain_index == 0  # digits rows are all of domain "default"
    assert (distill.modules, distill.caches, distill.tags) == ({}, [], {})  # online: no cache read


def test_online_kd_serves_the_teachers_own_outputs(teachers: dict[str, str]):
    a, b = load_teacher(teachers["cached"], CPU), load_teacher(teachers["digits"], CPU)
    cfg = _cfg("teacher_mode=online")
    train = _rows(cfg)
    rows = np.arange(len(train))[::-37].copy()  # (B,) in no loader order
    batch = train.with_normalisation(a.normalisation).batch(rows)
    with torch.no_grad():
        out_a, out_b = a.model(batch[0]).double(), b.model(batch[0]).double()
    assert (out_a - out_b).abs().max() > 0.1  # the teachers really differ

    one = build_distillation(cfg, [a], _student(cfg), train, dataset_digest(train), CPU)
    assert one.loss.domain_index is None
    torch.testing.assert_close(one.loss.teacher_logits_fn(batch).double(), out_a, rtol=0, atol=1e-6)

    cfg = _cfg("teacher_mode=online", "kd.fusion=weighted", "kd.fusion_weights=[3,1]")
    two = build_distillation(cfg, [a, b], _student(cfg), train, dataset_digest(train), CPU)
    torch.testing.assert_close(two.loss.teacher_logits_fn(batch).double(), 0.75 * out_a + 0.25 * out_b,
                               rtol=0, atol=1e-5)
    cfg = _cfg("teacher_mode=online")
    two = build_distillation(cfg, [a, b], _student(cfg), train, dataset_digest(train), CPU)
    torch.testing.assert_close(two.loss.teacher_logits_fn(batch).double(), (out_a + out_b) / 2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_weighted_fusion_needs_one_weight_per_teacher(teachers: dict[str, str], mode: str):
    cfg = _cfg(f"teacher_mode={mode}", "kd.fusion=weighted", "kd.fusion_weights=[1]")
    train = _rows(cfg)
    loaded = [load_teacher(teachers["cached"], CPU), load_teacher(teachers["digits"], CPU)]
    with pytest.raises(BadInput, match="kd.fusion=weighted needs 2 weights, got 1"):
        build_distillation(cfg, loaded, _student(cfg), train, dataset_digest(train), CPU)


def test_online_teachers_must_share_one_input_normalisation(teachers: dict[str, str]):
    a = load_teacher(teachers["cached"], CPU)
    other = dataclasses.replace(a, normalisation=Normalisation(a.normalisation.mean, a.normalisation.std * 2))
    _same_inputs([a])
    _same_inputs([a, dataclasses.replace(a)])
    for pair in ([a, other], [other, a]):
        with pytest.raises(BadInput, match="different input normalisations"):
            _same_inputs(pair)
    cfg = _cfg("teacher_mode=online")
    train = _rows(cfg)
    with pytest.raises(BadInput, match="different input normalisations"):
        build_distillation(cfg, [a, other], _student(cfg), train, dataset_digest(train), CPU)


def test_cached_kd_serves_the_newest_good_cache_rows(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg("kd.domain=default")
    train = _rows(cfg)
    teacher = load_teacher(teachers["cached"], CPU)
    distill = build_distillation(cfg, [teacher], _student(cfg), train, dataset_digest(train), CPU)
    key = _tags(caches["middle"])["kdtrack.cache_key"]
    assert distill.caches == [CacheRef(caches["middle"], teachers["cached"], key)]
    assert distill.tags == {"kdtrack.cache_run_ids": caches["middle"]}
    assert distill.modules == {} and distill.loss.domain_index == 0 and distill.loss.config.label_smoothing == 0.0
    rows = np.arange(len(train))[::-41].copy()
    batch = train.with_normalisation(teacher.normalisation).batch(rows)
    served = distill.loss.teacher_logits_fn(batch).double().numpy()
    np.testing.assert_allclose(served, _zarr_logits(caches["middle"], [train.sample_ids[r] for r in rows]),
                               rtol=0, atol=1e-6)


def test_cached_kd_fuses_the_pinned_caches_rows(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg()
    train = _rows(cfg)
    loaded = [load_teacher(teachers["cached"], CPU), load_teacher(teachers["digits"], CPU)]
    pinned = [caches["older"], caches["digits"]]  # not the newest cache of its teacher: pinned wins
    distill = build_distillation(cfg, loaded, _student(cfg), train, dataset_digest(train), CPU, cache_run_ids=pinned)
    assert distill.caches == [CacheRef(c, t, _tags(c)["kdtrack.cache_key"])
                              for c, t in zip(pinned, (teachers["cached"], teachers["digits"]))]
    assert distill.tags == {"kdtrack.cache_run_ids": f"{caches['older']},{caches['digits']}"}
    rows = np.arange(len(train))[::-53].copy()
    ids = [train.sample_ids[r] for r in rows]
    a, b = _zarr_logits(caches["older"], ids), _zarr_logits(caches["digits"], ids)
    assert np.abs(a - b).max() > 0.1
    served = distill.loss.teacher_logits_fn(train.batch(rows)).double().numpy()
    np.testing.assert_allclose(served, (a + b) / 2, rtol=0, atol=1e-6)
    cfg = _cfg("kd.fusion=weighted", "kd.fusion_weights=[3,1]")
    distill = build_distillation(cfg, loaded, _student(cfg), train, dataset_digest(train), CPU, cache_run_ids=pinned)
    served = distill.loss.teacher_logits_fn(train.batch(rows)).double().numpy()
    np.testing.assert_allclose(served, 0.75 * a + 0.25 * b, rtol=0, atol=1e-6)
    with pytest.raises(BadInput, match="1 cache runs given for 2 teachers"):
        build_distillation(cfg, loaded, _student(cfg), train, dataset_digest(train), CPU,
                           cache_run_ids=pinned[:1])


def test_cached_kd_under_mixup_mixes_each_samples_cached_targets_as_the_inputs(teachers: dict[str, str],
                                                                              caches: dict[str, str]):
    """A cache holds each sample's own outputs; mixup mixes inputs i and partner j as λ·x_i + (1-λ)·x_j, so the
    cached targets must be mixed the same way: λ·p_i + (1-λ)·p_j."""
    cfg = _cfg("data.augment=[mixup(alpha=1)]")
    train = _rows(cfg)
    student = _student(cfg)
    distill = build_distillation(cfg, [load_teacher(teachers["cached"], CPU)], student, train, dataset_digest(train),
                                 CPU, cache_run_ids=[caches["middle"]])
    seen = []  # the batch the KD loss got: mixed inputs and the Mix that made them

    def recorded(model, batch, epoch):
        seen.append(batch)
        return distill.loss(model, batch, epoch)

    distill.training_loss.loss = recorded
    rows = np.arange(len(train))[::-37].copy()
    _, terms = distill.training_loss(student, train.batch(rows), 0)
    x, mix = seen[0][0], seen[0][4]
    assert (mix.partner != torch.arange(len(rows))).any() and (mix.lam < 0.99).any()  # samples were mixed
    logits = torch.from_numpy(_zarr_logits(caches["middle"], [train.sample_ids[r] for r in rows]))
    p = torch.softmax(logits / 4, dim=1)  # kd.temperature 4 (experiments/digits.yaml)
    lam = mix.lam.double()[:, None]
    target = lam * p + (1 - lam) * p[mix.partner]
    with torch.no_grad():
        log_q = torch.log_softmax(student(x).double() / 4, dim=1)
    kl = (target * (target.log() - log_q)).sum(dim=1).mean()
    assert terms["kd"].item() == pytest.approx(0.7 * 16 * kl.item(), rel=1e-4)  # kd.alpha 0.7, T² 16


def test_cached_kd_splits_cache_memory_budget_mb_among_the_teachers(teachers: dict[str, str],
                                                                     caches: dict[str, str]):
    cfg = _cfg()
    train = _rows(cfg)
    loaded = [load_teacher(teachers["cached"], CPU), load_teacher(teachers["digits"], CPU)]
    nbytes = len(train) * 10 * 4  # float32 logits of 10 classes per row: what one table holds in memory

    def build(budget_bytes: int, count: int):
        cfg = _cfg(f"cache.memory_budget_mb={budget_bytes / 2**20!r}")  # exact: a power-of-two divisor
        pinned = [caches["older"], caches["digits"]][:count]
        return build_distillation(cfg, loaded[:count], _student(cfg), train, dataset_digest(train), CPU,
                                  cache_run_ids=pinned)

    assert build(nbytes, 1).chunked is None  # fits exactly: held in memory
    # a byte less and the table is read by chunks; this cache is one chunk, which that budget cannot hold
    with pytest.raises(CacheError, match=f"memory budget {nbytes - 1} B holds no chunk"):
        build(nbytes - 1, 1)
    with pytest.raises(CacheError, match=f"memory budget {nbytes // 2} B holds no chunk"):  # half for each of two
        build(nbytes, 2)


def test_cached_kd_reads_the_store_by_sample_id_and_refuses_another_digest(teachers: dict[str, str],
                                                                            caches: dict[str, str]):
    """The store's rows are matched to the student's by sample id, not by position, and a store whose digest is not
    these rows' is refused even when its run's tag says the same (the cache key alone would not tell)."""
    cfg = _cfg()
    train = _rows(cfg)
    teacher = load_teacher(teachers["cached"], CPU)
    run = caches["older"]
    store = tracking.local_artifact_dir(run) / "logits.zarr"
    kept, tag = store.with_name("kept.zarr"), "kdtrack.dataset_digest"
    digest, claimed = dataset_digest(train), _tags(run)[tag]
    shutil.copytree(store, kept)
    try:
        group = zarr.open_group(str(store), mode="r+")
        for name in ("sample_ids", "logits"):  # rows 0 and 1 change places, ids and logits alike
            values = group[name][:]
            values[[0, 1]] = values[[1, 0]]
            group[name][:] = values
        rows = np.array([0, 1, 2])
        distill = build_distillation(cfg, [teacher], _student(cfg), train, digest, CPU, cache_run_ids=[run])
        served = distill.loss.teacher_logits_fn(train.batch(rows)).double().numpy()
        by_id = _zarr_logits(run, [train.sample_ids[r] for r in rows])
        assert np.abs(by_id[0] - by_id[1]).max() > 0.1
        np.testing.assert_allclose(served, by_id, rtol=0, atol=1e-6)

        group.attrs["dataset_digest"] = "0" * 64
        MlflowClient().set_tag(run, tag, "0" * 64)
        with pytest.raises(CacheError, match=f"is for dataset 000000000000, not for this dataset {digest[:12]}"):
            build_distillation(cfg, [teacher], _student(cfg), train, digest, CPU, cache_run_ids=[run])
    finally:
        MlflowClient().set_tag(run, tag, claimed)
        shutil.rmtree(store)
        kept.rename(store)


def test_build_missing_cache_builds_one_for_these_rows(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg("data.seed=7")  # another split: rows no cache of this teacher holds
    train = _rows(cfg)
    before = _complete_caches_of(teachers["cached"])
    teacher = load_teacher(teachers["cached"], CPU)
    with pytest.raises(CacheNotFound):  # not unless asked for
        build_distillation(cfg, [teacher], _student(cfg), train, dataset_digest(train), CPU)
    assert _complete_caches_of(teachers["cached"]) == before
    distill = build_distillation(cfg, [teacher], _student(cfg), train, dataset_digest(train), CPU,
                                 build_missing_cache=True)
    (ref,) = distill.caches
    built = _tags(ref.run_id)
    assert ref.run_id not in caches.values() and _complete_caches_of(teachers["cached"]) == before + 1
    assert (ref.teacher_run_id, ref.cache_key) == (teachers["cached"], built["kdtrack.cache_key"])
    assert built["kdtrack.teacher_run_id"] == teachers["cached"] and built["kdtrack.complete"] == "true"
    assert built["kdtrack.dataset_digest"] == dataset_digest(train)
    assert distill.tags == {"kdtrack.cache_run_ids": ref.run_id}


# ------------------------------------------------------------------------------------ resolve_cache, pinned_cache

def test_resolve_cache_passes_over_and_marks_a_broken_newer_cache(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg()
    train = _rows(cfg)
    ref = resolve_cache(cfg, load_teacher(teachers["cached"], CPU), train, dataset_digest(train), CPU, False)
    key = _tags(caches["middle"])["kdtrack.cache_key"]
    assert ref == CacheRef(caches["middle"], teachers["cached"], key)
    assert _tags(caches["broken"])["kdtrack.cache_key"] == key != _tags(caches["half"])["kdtrack.cache_key"]
    broken = _tags(caches["broken"])
    assert (broken["kdtrack.complete"], broken["kdtrack.verified"]) == ("false", "fail")
    assert broken["kdtrack.problem"] == f"the store of cache run {caches['broken']} is not marked complete"
    assert _tags(caches["middle"])["kdtrack.complete"] == "true"


def test_resolve_cache_of_another_dtype_finds_that_cache(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg("cache.dtype=float16")
    train = _rows(cfg)
    ref = resolve_cache(cfg, load_teacher(teachers["cached"], CPU), train, dataset_digest(train), CPU, False)
    assert ref == CacheRef(caches["half"], teachers["cached"], _tags(caches["half"])["kdtrack.cache_key"])


def test_resolve_cache_without_a_match_names_the_other_caches(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg("data.seed=9")
    train = _rows(cfg)
    digest = dataset_digest(train)
    teacher = load_teacher(teachers["cached"], CPU)
    with pytest.raises(CacheNotFound) as raised:
        resolve_cache(cfg, teacher, train, digest, CPU, False)
    count = _complete_caches_of(teachers["cached"])
    assert count >= 3  # older, middle, half at least
    assert raised.value.what == (f"no finished cache for teacher run {teachers['cached']} (best.pt) and dataset "
                                 f"{digest[:12]} in float32 ({count} cache(s) of this teacher exist, for other data, "
                                 "checkpoint or dtype)")
    assert f"kdtrack cache-logits --teacher-run-id {teachers['cached']}" in raised.value.fix


def test_resolve_cache_without_a_match_names_a_broken_cache_of_these_rows(teachers: dict[str, str],
                                                                          caches: dict[str, str]):
    cfg = _cfg("data.seed=21")  # rows whose only cache is broken
    train = _rows(cfg)
    digest = dataset_digest(train)
    only = cache_logits.run(cfg, teachers["cached"])
    zarr.open_group(str(tracking.local_artifact_dir(only) / "logits.zarr"), mode="r+").attrs["complete"] = False
    with pytest.raises(CacheNotFound) as raised:
        resolve_cache(cfg, load_teacher(teachers["cached"], CPU), train, digest, CPU, False)
    assert _tags(only)["kdtrack.complete"] == "false"
    others = _complete_caches_of(teachers["cached"])  # the broken one no longer among them
    assert raised.value.what == (f"no finished cache for teacher run {teachers['cached']} (best.pt) and dataset "
                                 f"{digest[:12]} in float32 ({others} cache(s) of this teacher exist, for other data, "
                                 "checkpoint or dtype; 1 cache(s) of these rows failed their store check and were "
                                 "marked incomplete)")


def test_resolve_cache_finds_caches_by_teacher_run_not_by_key(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg()
    train = _rows(cfg)
    digest = dataset_digest(train)
    twin = load_teacher(teachers["twin"], CPU)
    assert twin.checkpoint_sha256 == _tags(caches["middle"])["kdtrack.checkpoint_sha256"]  # the same key...
    with pytest.raises(CacheNotFound) as raised:  # ...but no cache of this run
        resolve_cache(cfg, twin, train, digest, CPU, False)
    assert raised.value.what == (f"no finished cache for teacher run {teachers['twin']} (best.pt) and dataset "
                                 f"{digest[:12]} in float32")


def test_pinned_cache_takes_its_own_cache_and_refuses_any_other(teachers: dict[str, str], caches: dict[str, str]):
    cfg = _cfg()
    train = _rows(cfg)
    digest = dataset_digest(train)
    teacher, twin = load_teacher(teachers["cached"], CPU), load_teacher(teachers["twin"], CPU)
    for run in ("older", "middle"):
        assert pinned_cache(cfg, teacher, train, digest, CPU, caches[run]) == \
            CacheRef(caches[run], teachers["cached"], _tags(caches["middle"])["kdtrack.cache_key"])
    refusals = [(teacher, "half", "has cache_key="),  # float16: another key
                (teacher, "digits", "has cache_key="),  # another teacher's weights
                (twin, "middle", "has teacher_run_id="),  # equal weights, equal key, but another teacher run
                (teacher, "broken", "(is not marked complete|complete=false)")]  # as found, or once marked
    for who, run, problem in refusals:
        with pytest.raises(CacheError, match=f"cannot read cache run {caches[run]}: .*{problem}"):
            pinned_cache(cfg, who, train, digest, CPU, caches[run])


# ----------------------------------------------------------------------------------------------- feature methods

def test_feature_methods_need_one_teacher_online(teachers: dict[str, str]):
    teacher = load_teacher(teachers["twin"], CPU)
    for sets, loaded in ((("teacher_mode=cached",), [teacher]), ((), [teacher, teacher])):
        cfg = _cfg(*FT, "method=fitnet", *sets)
        train = _rows(cfg)
        with pytest.raises(BadInput, match="method fitnet reads the teacher's features"):
            build_distillation(cfg, loaded, _student(cfg), train, dataset_digest(train), CPU)


def test_fitnet_is_feature_kd_at_kd_alpha_without_tags(teachers: dict[str, str]):
    cfg = _cfg(*FT, "method=fitnet")
    train = _rows(cfg)
    teacher = load_teacher(teachers["twin"], CPU)
    distill = build_distillation(cfg, [teacher], _student(cfg), train, dataset_digest(train), CPU)
    assert type(distill.loss) is FeatureKD and distill.loss.alpha == 0.3
    assert distill.loss.teacher is teacher.model and distill.loss.label_smoothing == 0.0
    assert list(distill.modules) == ["method"] and distill.loss.method is distill.modules["method"]
    assert distill.modules["method"].name == "fitnet"
    assert (distill.caches, distill.tags) == ([], {})


def test_ft_trains_its_paraphraser_on_rank_0_and_the_other_ranks_load_it(teachers: dict[str, str],
                                                                         monkeypatch: pytest.MonkeyPatch):
    cfg = _cfg(*FT, "seed=11")  # a paraphraser key of this test alone
    train = _rows(cfg)
    digest = dataset_digest(train)
    teacher = load_teacher(teachers["twin"], CPU)
    distill = build_distillation(cfg, [teacher], _student(cfg), train, digest, CPU)
    key = _paraphraser_key(teacher, digest, seed=11)
    assert distill.tags == {"kdtrack.paraphraser": f"trained {key}"}
    method = distill.modules["method"]
    assert (method.name, method.teacher_layers) == ("ft", ("block3",))
    assert type(distill.loss) is FeatureKD and distill.loss.alpha == 0.3 and distill.loss.method is method
    assert f"paraphrasers/{key}.pt" in tracking.list_artifacts(teachers["twin"], "paraphrasers")
    stored = _artifact(teachers["twin"], key).read_bytes()

    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 of a torchrun launch (no process group: the barrier is a no-op)
    monkeypatch.setenv("RANK", "1")
    follower = build_distillation(cfg, [teacher], _student(cfg, seed=1), train, digest, CPU)
    assert follower.tags == {"kdtrack.paraphraser": f"reused {key}"}
    assert _artifact(teachers["twin"], key).read_bytes() == stored
    assert _same_state(follower.modules["method"].paraphraser.state_dict(), method.paraphraser.state_dict())


# ------------------------------------------------------------------------------------------ _prepare_paraphraser

def test_paraphraser_is_trained_stored_reused_and_a_replaced_file_refused(teachers: dict[str, str]):
    cfg = _cfg(*FT, "seed=12")
    teacher = load_teacher(teachers["twin"], CPU)
    rows = _small_rows(cfg)
    digest = dataset_digest(rows)
    key = _paraphraser_key(teacher, digest, seed=12)
    method = _ft_method(teacher, seed=0)
    by_hand = copy.deepcopy(method.paraphraser)  # trained below, outside kdtrack's stage

    assert _prepare_paraphraser(cfg, teacher, method, rows, digest, CPU) == f"trained {key}"
    path = _artifact(teachers["twin"], key)
    assert f"paraphrasers/{key}.pt" in tracking.list_artifacts(teachers["twin"], "paraphrasers")
    assert _tags(teachers["twin"])[f"kdtrack.paraphraser_sha256.{key}"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The stored weights are those of Adam (lr 1e-3) over one shuffled epoch of the normalised rows, batch 64.
    loader = make_loader(rows.with_normalisation(teacher.normalisation), 64, shuffle=True, seed=12, device=CPU)
    losses = train_paraphraser(by_hand, teacher.model, loader, layer="block3", epochs=1, lr=1e-3, device=CPU)
    payload = torch.load(path, weights_only=True)
    assert sorted(payload) == ["layer", "losses", "rate", "state_dict"]
    assert (payload["layer"], payload["rate"], payload["losses"]) == ("block3", 0.5, losses)
    assert _same_state(payload["state_dict"], by_hand.state_dict())
    assert _same_state(method.paraphraser.state_dict(), by_hand.state_dict())
    assert not (Path.cwd() / f"{key}.pt").exists()  # written in a temporary folder, not left behind

    again = _ft_method(teacher, seed=1)
    assert not _same_state(again.paraphraser.state_dict(), payload["state_dict"])
    assert _prepare_paraphraser(cfg, teacher, again, rows, digest, CPU) == f"reused {key}"
    assert _same_state(again.paraphraser.state_dict(), payload["state_dict"])

    payload["state_dict"] = {k: v + 1 for k, v in payload["state_dict"].items()}  # another valid file in its place
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"paraphraser {key} of teacher run {teachers['twin']} has sha256 "
                                              f"{hashlib.sha256(path.read_bytes()).hexdigest()[:12]} but the run"):
        _prepare_paraphraser(cfg, teacher, _ft_method(teacher, seed=2), rows, digest, CPU)


@pytest.mark.parametrize("left", ["file-without-tag", "tag-without-file"])
def test_paraphraser_is_reused_only_with_both_its_file_and_its_tag(teachers: dict[str, str], left: str,
                                                                   tmp_path: Path):
    seed = {"file-without-tag": 13, "tag-without-file": 14}[left]  # a key of each case alone
    cfg = _cfg(*FT, f"seed={seed}")
    teacher = load_teacher(teachers["twin"], CPU)
    rows = _small_rows(cfg)
    digest = dataset_digest(rows)
    key = _paraphraser_key(teacher, digest, seed=seed)
    owner = tracking.StageRun.of(teachers["twin"])
    if left == "file-without-tag":
        stray = _ft_method(teacher, seed=3).paraphraser
        torch.save({"state_dict": stray.state_dict()}, tmp_path / f"{key}.pt")
        owner.log_artifact(tmp_path / f"{key}.pt", "paraphrasers")
    else:  # as a run killed between recording the hash and uploading the file leaves it
        owner.set_tags({f"kdtrack.paraphraser_sha256.{key}": "0" * 64})
    method = _ft_method(teacher, seed=4)
    assert _prepare_paraphraser(cfg, teacher, method, rows, digest, CPU) == f"trained {key}"
    path = _artifact(teachers["twin"], key)
    assert _tags(teachers["twin"])[f"kdtrack.paraphraser_sha256.{key}"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _same_state(torch.load(path, weights_only=True)["state_dict"], method.paraphraser.state_dict())


# ----------------------------------------------------------------------------------------------- small helpers

def test_domain_index_is_the_position_among_sorted_domain_names():
    ds = IndexedDataset(np.zeros((3, 1, 2, 2)), np.array([0, 1, 0]), ["s0", "s1", "s2"],
                        np.array(["train"] * 3), np.array(["b", "a", "c"]), num_classes=2, source="hand")
    assert ds.domain_names == ["a", "b", "c"]
    assert _domain_index(ds, "") is None
    assert (_domain_index(ds, "a"), _domain_index(ds, "c")) == (0, 2)
    with pytest.raises(BadInput, match="kd.domain='z' is not a domain of the training data"):
        _domain_index(ds, "z")
