"""Resolve a teacher run id to a ready model: its checkpoint, rebuilt from the spec it carries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdtrack import checkpoint, external, tracking
from kdtrack.data import IndexedDataset, Normalisation
from kdtrack.errors import CheckpointError, RunNotFound, TeacherError
from kdtrack.models import ModelSpec, build_model

TEACHER_STAGES = ("teacher",)  # stages whose runs hold checkpoints/<name>.pt a cache can be built from


@dataclass
class Teacher:
    """A loaded teacher: the eval-mode model on its device and what identifies it."""

    run_id: str
    run_name: str
    checkpoint_name: str  # "best" | "last"
    model: torch.nn.Module
    spec: ModelSpec
    normalisation: Normalisation
    checkpoint_sha256: str
    payload: dict[str, Any]


def load_teacher(run_id: str, device: torch.device, which: str = "best") -> Teacher:
    """The teacher of run `run_id` from its `checkpoints/<which>.pt`, model rebuilt from the checkpoint's spec."""
    run = teacher_run(run_id)
    artifact = f"checkpoints/{which}.pt"
    available = tracking.list_artifacts(run_id, "checkpoints")
    if artifact not in available:
        have = ", ".join(p.rsplit("/", 1)[-1].removesuffix(".pt") for p in available) or "none"
        raise TeacherError(f"teacher run {run_id} has no checkpoint {which!r} (it has: {have})",
                           "pick one with --checkpoint, or finish training the teacher")
    path = tracking.artifact_path(run_id, artifact)
    payload = checkpoint.load(path, map_location="cpu")
    check_recorded_hash(run, which, payload["weights_sha256"])
    spec = ModelSpec.from_dict(payload["spec"])
    if external.is_external(spec.name):
        check_code_version(run, spec.name)
    model = build_model(spec)
    external.load_strict(model, payload["state_dict"], f"checkpoint {which!r} of run {run_id}",
                         "the checkpoint's spec and weights disagree; retrain or re-save the teacher")
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return Teacher(run_id=run_id, run_name=run.info.run_name, checkpoint_name=which, model=model, spec=spec,
                   normalisation=Normalisation.from_dict(payload["normalisation"]),
                   checkpoint_sha256=payload["weights_sha256"], payload=payload)


# Tags of a teacher registered from a checkpoint written elsewhere (kdtrack register-teacher).
SOURCE_TAGS = {"file": f"{tracking.TAG}source_file", "sha256": f"{tracking.TAG}source_sha256",
               "definition": f"{tracking.TAG}model_definition", "code": f"{tracking.TAG}model_code_version"}


def check_code_version(run: Any, definition: str) -> None:
    """Refuse a registered teacher whose model code is no longer the code it was registered with: the same weights
    in a changed class are another model."""
    recorded = run.data.tags.get(SOURCE_TAGS["code"], "none recorded")
    now = external.code_version(definition)
    if now != recorded:
        raise TeacherError(f"teacher run {run.info.run_id} was registered with {definition} at {recorded[:19]} but "
                           f"that code is now {now[:19]}",
                           "restore that code, or register the checkpoint again with this code (a new teacher run)")


def teacher_run(run_id: str) -> Any:
    """The run `run_id`, refused with a TeacherError unless it is a live teacher run of this store."""
    try:
        run = tracking.get_run(run_id)
    except RunNotFound as exc:
        raise TeacherError(f"teacher run {run_id} not found in {tracking.tracking_uri()}",
                           "check the id (mlflow ui lists runs) and MLFLOW_TRACKING_URI") from exc
    if run.info.lifecycle_stage == "deleted":
        raise TeacherError(f"teacher run {run_id} ({run.info.run_name}) is deleted",
                           f"restore it with `mlflow runs restore --run-id {run_id}`, or pick another teacher")
    stage = run.data.tags.get(f"{tracking.TAG}stage")
    if stage not in TEACHER_STAGES:
        what = f"a {stage} run" if stage else "not a kdtrack run"
        raise TeacherError(f"run {run_id} ({run.info.run_name}) is {what}, not a teacher",
                           "pass the run id printed by `kdtrack train-teacher`")
    return run


# The run tag that records each checkpoint's weights hash when the run wrote it.
HASH_TAGS = {"best": f"{tracking.TAG}checkpoint_sha256", "last": f"{tracking.TAG}checkpoint_sha256_last"}


def check_recorded_hash(run: Any, which: str, actual: str, also: tuple[str, ...] = ()) -> None:
    """Refuse checkpoint `which` of `run` unless its weights hash is the one the run recorded when it wrote it (or
    one of `also`): a file swapped for another run's valid checkpoint is caught here."""
    recorded = run.data.tags.get(HASH_TAGS[which])
    if actual != recorded and actual not in also:
        raise CheckpointError(
            f"checkpoint {which}.pt of run {run.info.run_id} has weights {actual[:12]} but the run recorded "
            f"{(recorded or 'no hash')[:12]} when it wrote it",
            "the file was replaced or the run is incomplete; re-download or retrain it, never rename checkpoints "
            "between runs")


def check_fits(teacher: Teacher, dataset: IndexedDataset, classes: bool = True) -> None:
    """Refuse, before any run starts, a teacher built for another input shape (or, with `classes`, another
    class count) than the data."""
    spec = teacher.spec
    if tuple(spec.input_shape) != tuple(dataset.input_shape):
        raise TeacherError(f"teacher run {teacher.run_id} takes inputs of shape {tuple(spec.input_shape)} but the "
                           f"data's samples have shape {tuple(dataset.input_shape)}",
                           "use the data the teacher was trained on, or train a teacher for this data")
    if classes and spec.num_classes != dataset.num_classes:
        raise TeacherError(f"teacher run {teacher.run_id} outputs {spec.num_classes} classes but the data has "
                           f"{dataset.num_classes}", "use a teacher trained on these classes")

