"""The student's loss for `cfg.method`: logit KD from cached or live teachers, or a feature method."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdtrack import checkpoint, distributed, engine, tracking
from kdtrack.cache import LogitTable
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, make_loader
from kdtrack.errors import BadInput, CacheNotFound
from kdtrack.losses.feature import FeatureKD, build_feature_method
from kdtrack.losses.fusion import fuse_teachers
from kdtrack.losses.kd import KDLossConfig, LogitKD
from kdtrack.losses.factor_transfer import train_paraphraser
from kdtrack.teachers import Teacher

T = tracking.TAG


@dataclass(frozen=True)
class CacheRef:
    run_id: str
    teacher_run_id: str
    cache_key: str


@dataclass
class Distillation:
    """An engine loss plus what it trains besides the student (`modules`) and where its targets came from."""

    loss: Any
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    caches: list[CacheRef] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


def build_distillation(cfg: Config, teachers: list[Teacher], student: torch.nn.Module, train: IndexedDataset,
                       digest: str, device: torch.device, *, build_missing_cache: bool = False) -> Distillation:
    """The loss of `cfg.method`; `train` holds the raw (un-normalised) training rows in loader order and
    `digest` is their dataset digest."""
    if cfg.method == "none":
        return Distillation(engine.SupervisedLoss(cfg.train.label_smoothing))
    if cfg.method == "kd":
        return _logit_kd(cfg, teachers, train, digest, device, build_missing_cache)
    return _feature_kd(cfg, teachers, student, train, digest, device)


def _logit_kd(cfg: Config, teachers: list[Teacher], train: IndexedDataset, digest: str, device: torch.device,
              build_missing_cache: bool) -> Distillation:
    kd = cfg.kd
    # The hard-label term stays hard: label smoothing is never applied together with KD.
    loss_cfg = KDLossConfig(temperature=kd.temperature, kd_alpha=kd.alpha, loss_type=kd.loss_type,
                            kd_weighting=kd.weighting, confidence_threshold=kd.confidence_threshold,
                            warmup_epochs=kd.warmup_epochs, kd_ramp_epochs=kd.ramp_epochs, regression=kd.regression,
                            label_smoothing=0.0)
    if kd.fusion == "weighted" and len(kd.fusion_weights) != len(teachers):
        raise BadInput(f"kd.fusion=weighted needs {len(teachers)} weights, got {len(kd.fusion_weights)}",
                       f"e.g. --set kd.fusion_weights=[{','.join(['1'] * len(teachers))}]")
    weights = list(kd.fusion_weights) if kd.fusion == "weighted" else None
    domain = _domain_index(train, kd.domain)
    if cfg.teacher_mode == "online":
        _same_inputs(teachers)
        models = [t.model for t in teachers]

        def online(batch: Any) -> torch.Tensor:
            with torch.no_grad():
                return fuse_teachers([m(batch[0]) for m in models], kd.fusion, weights)

        return Distillation(LogitKD(online, loss_cfg, domain))
    caches = [resolve_cache(cfg, t, digest, build_missing_cache) for t in teachers]
    tables = [LogitTable.open(tracking.artifact_path(c.run_id, "logits.zarr"), train, expected_digest=digest)
              .to(device) for c in caches]

    def cached(batch: Any) -> torch.Tensor:
        rows = batch[2]  # (B,) dataset rows, aligned to cache rows once when the table opened
        return tables[0][rows] if len(tables) == 1 else fuse_teachers([t[rows] for t in tables], kd.fusion, weights)

    return Distillation(LogitKD(cached, loss_cfg, domain), caches=caches,
                        tags={f"{T}cache_run_ids": ",".join(c.run_id for c in caches)})


def resolve_cache(cfg: Config, teacher: Teacher, digest: str, build_missing: bool) -> CacheRef:
    """The newest FINISHED complete cache of this teacher checkpoint over exactly the rows of `digest`."""
    found = tracking.find_runs({f"{T}stage": "cache", f"{T}teacher_run_id": teacher.run_id,
                                f"{T}complete": "true"})
    fresh = [r for r in found if r.data.tags.get(f"{T}dataset_digest") == digest
             and r.data.tags.get(f"{T}checkpoint_sha256") == teacher.checkpoint_sha256]
    if not fresh and build_missing:
        from kdtrack.stages import cache_logits  # the stage that builds it; imported only when needed

        fresh = [tracking.get_run(cache_logits.run(cfg, teacher.run_id))]  # under torchrun, with every rank
    if not fresh:
        stale = f" ({len(found)} cache(s) of this teacher exist, for other data or another checkpoint)" if found else ""
        raise CacheNotFound(
            f"no finished cache for teacher run {teacher.run_id} ({teacher.checkpoint_name}.pt) and dataset "
            f"{digest[:12]}{stale}",
            f"build it with: kdtrack cache-logits --teacher-run-id {teacher.run_id} with this command's "
            "--config/--set, or pass --build-missing-cache")
    run = fresh[0]
    return CacheRef(run.info.run_id, teacher.run_id, run.data.tags[f"{T}cache_key"])


def _feature_kd(cfg: Config, teachers: list[Teacher], student: torch.nn.Module, train: IndexedDataset,
                digest: str, device: torch.device) -> Distillation:
    if cfg.teacher_mode != "online" or len(teachers) != 1:
        raise BadInput(f"method {cfg.method} reads the teacher's features, so it needs one teacher run online",
                       "pass one --teacher-run-id and --set teacher_mode=online")
    teacher = teachers[0]
    method = build_feature_method(cfg.method, student, teacher.model, train.input_shape)
    tags = {}
    if cfg.method == "ft":
        # Under DDP rank 0 trains and stores the paraphraser first; the other ranks then load that one.
        if distributed.rank() == 0:
            tags[f"{T}paraphraser"] = _prepare_paraphraser(cfg, teacher, method, train, digest, device)
        distributed.barrier()
        if distributed.rank() != 0:
            tags[f"{T}paraphraser"] = _prepare_paraphraser(cfg, teacher, method, train, digest, device)
    return Distillation(FeatureKD(method, teacher.model, alpha=cfg.kd.alpha), modules={"method": method}, tags=tags)


def _prepare_paraphraser(cfg: Config, teacher: Teacher, method: torch.nn.Module, train: IndexedDataset,
                         digest: str, device: torch.device) -> str:
    """Factor Transfer stage one: train the paraphraser on the frozen teacher once, keep it as an artifact of
    the teacher run under `paraphrasers/`, and reuse it for every later student. Returns 'trained|reused <key>'."""
    layer, para = method.teacher_layers[0], method.paraphraser
    key = hashlib.sha256(json.dumps([teacher.checkpoint_sha256, layer, para.rate, cfg.kd.paraphraser_epochs,
                                     digest, cfg.seed]).encode()).hexdigest()[:16]
    artifact = f"paraphrasers/{key}.pt"
    if artifact in tracking.list_artifacts(teacher.run_id, "paraphrasers"):
        payload = checkpoint.load(tracking.artifact_path(teacher.run_id, artifact), required=("state_dict",),
                                  verify=False)
        para.load_state_dict(payload["state_dict"])
        return f"reused {key}"
    loader = make_loader(train.with_normalisation(teacher.normalisation), cfg.data.batch_size, shuffle=True,
                         seed=cfg.seed, device=device)
    losses = train_paraphraser(para, teacher.model, loader, layer=layer, epochs=cfg.kd.paraphraser_epochs,
                               lr=1e-3, device=device)
    print(f"paraphraser {key}: reconstruction loss {losses[0]:.4f} -> {losses[-1]:.4f}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{key}.pt"
        torch.save({"state_dict": para.state_dict(), "layer": layer, "rate": para.rate, "losses": losses}, path)
        tracking.StageRun.of(teacher.run_id).log_artifact(path, "paraphrasers")
    return f"trained {key}"


def _domain_index(train: IndexedDataset, domain: str) -> int | None:
    if not domain:
        return None
    if domain not in train.domain_names:
        raise BadInput(f"kd.domain={domain!r} is not a domain of the training data",
                       f"choose one of: {', '.join(train.domain_names)}")
    return train.domain_names.index(domain)


def _same_inputs(teachers: list[Teacher]) -> None:
    if any(t.normalisation != teachers[0].normalisation for t in teachers):
        raise BadInput("online teachers were trained with different input normalisations",
                       "cache their logits instead (teacher_mode=cached), which has no such restriction")
