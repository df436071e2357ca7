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

from kdtrack import augment, checkpoint, distributed, engine, tracking
from kdtrack.cache import LogitTable, default_memory_budget
from kdtrack.config import Config
from kdtrack.data import IndexedDataset, make_loader
from kdtrack.errors import BadInput, CacheError, CacheNotFound, CheckpointError
from kdtrack.losses.feature import FeatureKD, build_feature_method
from kdtrack.losses.fusion import fuse_teachers
from kdtrack.losses.kd import KDLossConfig, LogitKD
from kdtrack.losses.factor_transfer import train_paraphraser
from kdtrack.stages import cache_logits
from kdtrack.teachers import Teacher

T = tracking.TAG


@dataclass(frozen=True)
class CacheRef:
    run_id: str
    teacher_run_id: str
    cache_key: str


@dataclass
class Distillation:
    """An engine loss plus what it trains besides the student (`modules`) and where its targets came from.
    `training_loss` is the loss the student optimises: `loss` on the batches as data.augment augments them."""

    loss: Any
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    caches: list[CacheRef] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    training_loss: Any = None
    chunked: LogitTable | None = None  # a cache too big for the memory budget, read by whole chunks

    def __post_init__(self) -> None:
        if self.training_loss is None:
            self.training_loss = self.loss


def build_distillation(cfg: Config, teachers: list[Teacher], student: torch.nn.Module, train: IndexedDataset,
                       digest: str, device: torch.device, *, build_missing_cache: bool = False,
                       cache_run_ids: list[str] = ()) -> Distillation:
    """The loss of `cfg.method`; `train` holds the raw (un-normalised) training rows in loader order and
    `digest` is their dataset digest. `cache_run_ids` (one per teacher) pins the caches cached KD reads."""
    if cfg.method == "none":
        distill = Distillation(engine.SupervisedLoss(cfg.train.label_smoothing))
    elif cfg.method == "kd":
        distill = _logit_kd(cfg, teachers, train, digest, device, build_missing_cache, list(cache_run_ids))
    else:
        distill = _feature_kd(cfg, teachers, student, train, digest, device)
    if distill.training_loss is distill.loss:  # a view-consistent cache has set its own
        distill.training_loss = augment.training_loss(distill.loss, cfg.data.augment, cfg.seed)
    return distill


def _logit_kd(cfg: Config, teachers: list[Teacher], train: IndexedDataset, digest: str, device: torch.device,
              build_missing_cache: bool, cache_run_ids: list[str]) -> Distillation:
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
    if cache_run_ids and len(cache_run_ids) != len(teachers):
        raise BadInput(f"{len(cache_run_ids)} cache runs given for {len(teachers)} teachers", "give one per teacher")
    clean = _clean_targets(cfg)  # before any cache is looked for or built
    caches = ([pinned_cache(cfg, t, train, digest, device, c) for t, c in zip(teachers, cache_run_ids)]
              if cache_run_ids else [resolve_cache(cfg, t, train, digest, device, build_missing_cache) for t in teachers])
    tags = {f"{T}cache_run_ids": ",".join(c.run_id for c in caches), **clean}
    budget = (int(cfg.cache.memory_budget_mb * 2**20) if cfg.cache.memory_budget_mb
              else default_memory_budget(distributed.local_world_size()))
    tables = [LogitTable.open(tracking.artifact_path(c.run_id, "logits.zarr"), train, expected_digest=digest,
                              memory_budget_bytes=budget // len(caches)).to(device) for c in caches]
    views = cache_logits.cache_views(cfg)

    def cached(batch: Any) -> torch.Tensor:
        rows = batch[2]  # (B,) dataset rows, aligned to cache rows once when the table opened
        outputs = [t[rows] for t in tables]
        if views:  # (B, K, ...) per teacher: the view each sample was given (batch[5])
            pick = batch[5].to(outputs[0].device).view(-1, 1, *[1] * (outputs[0].dim() - 2))
            outputs = [o.gather(1, pick.expand(-1, 1, *o.shape[2:])).squeeze(1) for o in outputs]
        return outputs[0] if len(outputs) == 1 else fuse_teachers(outputs, kd.fusion, weights)

    loss = LogitKD(cached, loss_cfg, domain, mixes_targets=True)
    distill = Distillation(loss, caches=caches, tags=tags, chunked=next((t for t in tables if not t.in_memory), None))
    if views:
        batch_ops = [op for op in augment.parse(cfg.data.augment) if op.name in augment.BATCH_OPS]
        distill.training_loss = augment.ViewAugmented(loss, views, batch_ops, cfg.seed, tables[0].cache_rows)
        distill.tags[f"{T}cache_views"] = str(views.count)
    return distill


def _clean_targets(cfg: Config) -> dict[str, str]:
    """Refuse cached clean-sample targets for a student that trains on inputs they do not describe (augmented),
    unless kd.clean_targets says the user chose that; the tag records the choice. Mixup alone is consistent: the
    targets are mixed as the inputs are."""
    views = cache_logits.cache_views(cfg)
    replayed = {str(op) for op in views.ops} if views else set()
    off = [op for op in augment.off_target_ops(cfg.data.augment) if str(op) not in replayed]
    if not off:
        return {}
    if not cfg.kd.clean_targets:
        raise BadInput(f"data.augment ({', '.join(map(str, off))}) changes the inputs, but a logit cache holds the "
                       "teacher's outputs of the clean samples",
                       "train online (teacher_mode=online), or accept clean-sample targets with "
                       "--set kd.clean_targets=true")
    return {f"{T}clean_targets": "true"}


def resolve_cache(cfg: Config, teacher: Teacher, train: IndexedDataset, digest: str, device: torch.device,
                  build_missing: bool) -> CacheRef:
    """The newest cache run of this teacher with the key cfg.cache gives these rows (same checkpoint, same rows, same
    dtype) whose store checks out; one that does not is marked incomplete and passed over."""
    key = cache_logits.plan_for(cfg, teacher, train, device, digest).key
    of_teacher = tracking.find_runs({f"{T}stage": "cache", f"{T}teacher_run_id": teacher.run_id,
                                     f"{T}complete": "true"})
    for candidate in (r for r in of_teacher if r.data.tags.get(f"{T}cache_key") == key):
        problem = cache_logits.store_problem(candidate)
        if problem is None:
            return CacheRef(candidate.info.run_id, teacher.run_id, key)
        cache_logits.mark_broken(candidate, problem)
    if build_missing:
        return CacheRef(cache_logits.run(cfg, teacher.run_id), teacher.run_id, key)  # under torchrun, every rank
    # Each cache of this key failed its store check above: it is for these rows, not for other data.
    broken = sum(r.data.tags.get(f"{T}cache_key") == key for r in of_teacher)
    counts = {"cache(s) of this teacher exist, for other data, checkpoint or dtype": len(of_teacher) - broken,
              "cache(s) of these rows failed their store check and were marked incomplete": broken}
    found = "; ".join(f"{n} {what}" for what, n in counts.items() if n)
    others = f" ({found})" if found else ""
    raise CacheNotFound(
        f"no finished cache for teacher run {teacher.run_id} ({teacher.checkpoint_name}.pt) and dataset "
        f"{digest[:12]} in {cfg.cache.dtype}{others}",
        f"build it with: kdtrack cache-logits --teacher-run-id {teacher.run_id} with this command's "
        "--config/--set (train-student also takes --build-missing-cache)")


def pinned_cache(cfg: Config, teacher: Teacher, train: IndexedDataset, digest: str, device: torch.device,
                 cache_run_id: str) -> CacheRef:
    """The cache run named for `teacher`, refused unless it is a whole cache with the key cfg.cache gives these rows
    of that teacher."""
    key = cache_logits.plan_for(cfg, teacher, train, device, digest).key
    run = tracking.get_run(cache_run_id)
    problem = cache_logits.store_problem(run, {"cache_key": key, "teacher_run_id": teacher.run_id})
    if problem:
        raise CacheError(f"cannot read cache run {cache_run_id}: {problem}",
                         f"build the right one with: kdtrack cache-logits --teacher-run-id {teacher.run_id}")
    return CacheRef(cache_run_id, teacher.run_id, key)


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
    artifact, hash_tag = f"paraphrasers/{key}.pt", f"{T}paraphraser_sha256.{key}"
    recorded = tracking.get_run(teacher.run_id).data.tags.get(hash_tag)
    if recorded and artifact in tracking.list_artifacts(teacher.run_id, "paraphrasers"):
        path = tracking.artifact_path(teacher.run_id, artifact)
        actual = checkpoint.file_sha256(path)
        if actual != recorded:
            raise CheckpointError(f"paraphraser {key} of teacher run {teacher.run_id} has sha256 {actual[:12]} but the "
                                  f"run recorded {recorded[:12]} when it stored it",
                                  f"the file was replaced; delete {artifact} from the teacher run to train it anew")
        payload = checkpoint.load(path, required=("state_dict",), verify=False)
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
        owner = tracking.StageRun.of(teacher.run_id)
        owner.set_tags({hash_tag: checkpoint.file_sha256(path)})  # recorded first: a file without it is not reused
        owner.log_artifact(path, "paraphrasers")
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
