"""Register teachers trained elsewhere: a checkpoint file plus a model definition become a FINISHED teacher run.

The run holds `checkpoints/best.pt`, a kdtrack checkpoint of the same weights (loadable with `weights_only`), and
records where they came from (file name and sha256, model definition and its code version), the input shape, the
class count and the input normalisation the teacher expects. Every stage then treats it as any teacher run.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtrack import checkpoint, external, mlflow_model, tracking
from kdtrack.config import Config
from kdtrack.data import Normalisation
from kdtrack.errors import BadInput, ModelError
from kdtrack.models import ModelSpec
from kdtrack.stages.train_teacher import STAGE
from kdtrack.teachers import HASH_TAGS, SOURCE_TAGS

T = tracking.TAG
GROUP_STAGE = "teacher-group"


@dataclass(frozen=True)
class Definition:
    """What the user says the checkpoints are: a model definition with its keyword arguments, the input shape of
    one sample, the class count (None: read from the model's output) and the normalisation its inputs had."""

    model: str
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int | None
    normalisation: Normalisation


@dataclass(frozen=True)
class _Prepared:
    path: Path
    name: str
    definition: Definition
    source_sha256: str
    code_version: str
    spec: ModelSpec
    payload: dict[str, Any]


def run(cfg: Config, files: list[str], definition: Definition, names: list[str] | None = None) -> list[str]:
    """One teacher run per checkpoint file (nested under one parent run when there are several); return their ids
    in file order. Every file is loaded and checked before any run starts."""
    if not files:
        raise BadInput("no checkpoint file given", "pass one or more checkpoint files")
    external.check_definition(definition.model)
    if definition.model.split(":")[0] in external.PACKAGES and definition.num_classes is None:
        raise BadInput(f"{definition.model} needs the class count to be built", "pass --num-classes")
    names = names or [f"teacher-{Path(f).stem}" for f in files]
    if len(names) != len(files) or len(set(names)) != len(names):
        raise BadInput(f"{len(files)} files need as many distinct run names, got {names}",
                       "give one --name per file, or none (names then come from the file names)")
    prepared = [_prepare(Path(f), name, definition) for f, name in zip(files, names)]
    if len(prepared) == 1:
        return [_record(cfg, prepared[0])]
    with tracking.stage_run(GROUP_STAGE, cfg, run_name=f"register-{len(prepared)}-teachers",
                            description=f"Teachers registered from {', '.join(p.path.name for p in prepared)}.",
                            params=_params(definition, prepared[0].spec)) as parent:
        ids = [_record(cfg, p) for p in prepared]
        parent.set_tags({f"{T}teacher_run_ids": ",".join(ids)})
    return ids


def _prepare(path: Path, name: str, definition: Definition) -> _Prepared:
    """The file's weights in the defined model, checked: loaded weights-only (a pickled module is refused unrun),
    every key and shape matching, and one forward pass on a batch of the declared input shape."""
    raw = checkpoint.load(path, required=(), verify=False)
    state = external.state_dict_of(raw, str(path))
    model = external.build(definition.model, definition.num_classes or 2, definition.kwargs)
    external.load_strict(model, state, f"{path} for {definition.model}",
                         "check --model and --model-kwargs against the code that saved the file")
    classes = _output_classes(model, definition)
    channels = definition.normalisation.mean
    if isinstance(channels, tuple) and len(channels) not in (1, definition.input_shape[0]):
        raise BadInput(f"the normalisation has {len(channels)} channels but inputs of shape "
                       f"{definition.input_shape} have {definition.input_shape[0]}",
                       "give one mean and std per channel (the first axis of a sample), or one for all")
    spec = ModelSpec(definition.model, classes, definition.input_shape, definition.kwargs)
    source_sha256 = checkpoint.file_sha256(path)
    code = external.code_version(definition.model)
    payload = checkpoint.make_payload(
        model=model, spec=spec.to_dict(), normalisation=definition.normalisation.to_dict(), epoch=0, metrics={},
        extra={"registered_from": {"file": path.name, "sha256": source_sha256, "definition": definition.model,
                                   "code_version": code}})
    return _Prepared(path, name, definition, source_sha256, code, spec, payload)


def _output_classes(model: torch.nn.Module, definition: Definition) -> int:
    """The class count the model's output says, checked against the declared one."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *definition.input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModelError(f"{definition.model} does not take inputs of shape {definition.input_shape}: "
                         f"{str(exc).splitlines()[0][:160]}", "pass the shape of one sample with --input-shape") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{definition.model} gives {got} for a batch of 2, not logits (2, classes)",
                         "a teacher's forward must return a (batch, classes) tensor")
    classes = int(out.shape[1])
    if definition.num_classes is not None and classes != definition.num_classes:
        raise ModelError(f"{definition.model} outputs {classes} classes, not the {definition.num_classes} given",
                         "fix --num-classes or the model's keyword arguments")
    return classes


def _params(definition: Definition, spec: ModelSpec) -> dict[str, Any]:
    norm = definition.normalisation.to_dict()
    return {"model.definition": definition.model, "model.kwargs": json.dumps(definition.kwargs, sort_keys=True),
            "input_shape": "x".join(map(str, spec.input_shape)), "num_classes": spec.num_classes,
            "normalisation": "none" if _is_identity(definition.normalisation) else json.dumps(norm)}


def _is_identity(norm: Normalisation) -> bool:
    return Normalisation.from_dict(norm.to_dict()) == Normalisation(0.0, 1.0)


def _record(cfg: Config, prepared: _Prepared) -> str:
    definition = prepared.spec.name
    shape = "x".join(map(str, prepared.spec.input_shape))
    description = (f"Teacher registered from {prepared.path.name} (sha256 {prepared.source_sha256[:12]}): "
                   f"{definition} ({prepared.code_version[:19]}), inputs {shape}, {prepared.spec.num_classes} classes.")
    params = {**_params(prepared.definition, prepared.spec), "source_file": prepared.path.name}
    with tracking.stage_run(STAGE, cfg, run_name=prepared.name, description=description, params=params) as tracked:
        tracked.set_tags({HASH_TAGS["best"]: prepared.payload["weights_sha256"], f"{T}model": definition,
                          f"{T}registered": "true", SOURCE_TAGS["file"]: str(prepared.path.resolve()),
                          SOURCE_TAGS["sha256"]: prepared.source_sha256, SOURCE_TAGS["definition"]: definition,
                          SOURCE_TAGS["code"]: prepared.code_version})
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "best.pt"
            checkpoint.save(local, prepared.payload)
            tracked.log_artifact(local, "checkpoints")
            example = np.zeros((2, *prepared.spec.input_shape), dtype=np.float32)  # no data here: a zero batch
            mlflow_model.log(tracked.run_id, local, example, user_code=external.code_root(definition))
        return tracked.run_id
