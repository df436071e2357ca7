"""A teacher's or student's best checkpoint as an MLflow model (pyfunc): loads by `runs:/<run>/model`, by registry
name, and serves with `mlflow models serve`.

The model is "models from code" (`mlflow_model_code.py`), so nothing is unpickled: loading rebuilds the network
from the kdtrack checkpoint inside the model with `weights_only=True`, after checking that its weights are the ones
the run recorded. It carries a copy of the kdtrack modules that loading imports (`code_files`), so a Python with
mlflow, torch, numpy and PyYAML loads it without kdtrack installed.

Besides `tracking.py`, this module (with its `mlflow_model_code.py`) is the only one that imports mlflow: a pyfunc
model is a subclass of MLflow's class.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.models
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from kdtrack import checkpoint
from kdtrack.errors import BadInput, CheckpointError, TrackingError
from kdtrack.models import ModelSpec, build_model
from kdtrack.normalisation import Normalisation

ARTIFACT = "model"  # runs:/<run id>/model
CHECKPOINT, RECORDED = "checkpoint", "recorded"  # the model's artifact keys: best.pt, and the hash the run recorded
# What loading imports, pinned to the versions that logged the model: never kdtrack, which is not on PyPI (the model
# holds a copy of its code) and might name another project there.
REQUIREMENTS = ("mlflow", "torch", "numpy", "PyYAML")
_BATCH = 1024  # rows per forward pass in predict
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """Raw features (N, *input_shape), float32 -> model outputs (logits (N, classes)), float32; normalised as in
    training."""

    _skip_type_hint_validation = True  # MLflow checks inputs against the tensor signature instead

    def load_context(self, context: Any) -> None:
        recorded = json.loads(Path(context.artifacts[RECORDED]).read_text())
        payload = checkpoint.load(context.artifacts[CHECKPOINT], map_location="cpu")  # weights_only=True
        if payload["weights_sha256"] != recorded["checkpoint_sha256"]:
            raise CheckpointError(
                f"the checkpoint in this model has weights {payload['weights_sha256'][:12]} but run "
                f"{recorded['run_id']} recorded {recorded['checkpoint_sha256'][:12]}",
                "the model's files were changed; log the model again from its run")
        self.setup(payload)

    def setup(self, payload: dict[str, Any]) -> CheckpointModel:
        """The network of a checkpoint payload, in eval mode, and its input normalisation."""
        self.model = build_model(ModelSpec.from_dict(payload["spec"]))
        self.model.load_state_dict(payload["state_dict"])
        self.model.eval()
        norm = Normalisation.from_dict(payload["normalisation"] or {"mean": 0.0, "std": 1.0})
        self.mean, self.scale = norm.terms(len(payload["input_shape"]))  # one value, or one per channel
        return self

    def predict(self, context, model_input, params=None):  # no hints: MLflow would read a signature from them
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            # the same arithmetic as Normalisation.apply in training: (x - mean) * (1 / std)
            out = [self.model((batch - self.mean) * self.scale).float() for batch in x.split(_BATCH)]
        return torch.cat(out).numpy()


def log(run_id: str, best: Path, example: np.ndarray, user_code: Path | None = None) -> None:
    """Log `best` (the run's checkpoints/best.pt, the weights later stages use) as the MLflow model `model` of the
    active run `run_id`, with `example` (a few raw input rows) as its input example. Refuses a checkpoint whose
    weights are not the ones the run recorded. `user_code`: the package (or module) of a teacher's own model class,
    shipped with the model so that it loads elsewhere."""
    from kdtrack import tracking
    from kdtrack.teachers import HASH_TAGS

    payload = checkpoint.load(best, map_location="cpu")
    recorded = tracking.get_run(run_id).data.tags.get(HASH_TAGS["best"])
    if payload["weights_sha256"] != recorded:
        raise CheckpointError(f"{best} has weights {payload['weights_sha256'][:12]} but run {run_id} recorded "
                              f"{(recorded or 'no hash')[:12]}", "log the model from the run's own best.pt")
    example = np.ascontiguousarray(example, dtype=np.float32)
    signature = mlflow.models.infer_signature(example, CheckpointModel().setup(payload).predict(None, example))
    lineage = {"run_id": run_id, "checkpoint_sha256": recorded, "spec": payload["spec"]}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        here = Path(__file__).parent
        code = Path(tmp) / "kdtrack"
        for path in code_files():
            (code / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here / path, code / path)
        (Path(tmp) / "recorded.json").write_text(json.dumps(lineage, sort_keys=True))
        mlflow.pyfunc.log_model(
            name=ARTIFACT, python_model=str(here / "mlflow_model_code.py"),
            code_paths=[str(code), *([str(user_code)] if user_code else [])],
            artifacts={CHECKPOINT: str(best), RECORDED: str(Path(tmp) / "recorded.json")},
            signature=signature, input_example=example, pip_requirements=requirements(payload["spec"]["name"]),
            metadata={"kdtrack": lineage})


@functools.cache
def code_files() -> tuple[Path, ...]:
    """kdtrack's source files (relative to the package) that loading the model runs: mlflow_model_code.py and every
    kdtrack module it imports, transitively, where an import runs on import (not inside a function)."""
    root = Path(__file__).parent
    todo, seen, files = ["kdtrack.mlflow_model_code"], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its parent packages run first
        module = [root.joinpath(*parts[1:]).with_suffix(".py")] if len(parts) > 1 else []
        path = next((p for p in (*module, root.joinpath(*parts[1:], "__init__.py")) if p.is_file()), None)
        if path is None:  # a name imported from a module, not a module
            continue
        files.add(path.relative_to(root))
        todo += [n for n in _imports(ast.parse(path.read_text())) if n.split(".")[0] == "kdtrack"]
    return tuple(sorted(files))


def _imports(node: ast.AST) -> list[str]:
    """Module names that the import statements of `node` name, outside function bodies (which do not run on import);
    `from a import b` gives `a` and `a.b` (b may be a module)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return []
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return [name for child in ast.iter_child_nodes(node) for name in _imports(child)]


def requirements(model_name: str = "") -> list[str]:
    """`name==version` of each of REQUIREMENTS as installed here, and of the package that defines `model_name` when
    it is `torchvision:<name>` or `timm:<name>`."""
    package = model_name.split(":")[0] if ":" in model_name else ""
    return [*_pinned(REQUIREMENTS), *(_pinned((package,)) if package in ("torchvision", "timm") else [])]


@functools.cache
def _pinned(names: tuple[str, ...]) -> list[str]:
    # without a local label (torch 2.13.0+cpu -> ==2.13.0, which a +cpu build also meets): PyPI has no +cpu files
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in names]


def register(run_id: str, name: str) -> str:
    """Register the model of run `run_id` as a new version of the registered model `name`; return the version."""
    from kdtrack import tracking

    client = tracking.configure()
    logged = [m for m in client.search_logged_models(experiment_ids=[tracking.get_run(run_id).info.experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'") if m.name == ARTIFACT]
    if not logged:
        raise BadInput(f"run {run_id} has no MLflow model to register",
                       "it predates model logging: rerun it (pipeline: --force students)")
    newest = max(logged, key=lambda m: m.creation_timestamp)  # a resumed run may have logged one before
    try:
        version = mlflow.register_model(f"models:/{newest.model_id}", name)
    except MlflowException as exc:
        raise TrackingError(f"cannot register run {run_id}'s model as {name!r}: {str(exc).splitlines()[0][:200]}",
                            "check the name and that the tracking store has a model registry") from exc
    print(f"registered the model of run {run_id} as {name!r} version {version.version} "
          f"(models:/{name}/{version.version})", file=sys.stderr)
    return str(version.version)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Model logging without MLflow's chatter in every training run (progress bars, an INFO line), and without the
    temporary code folder that MLflow puts on sys.path when it checks the input example."""
    saved_path, logger = list(sys.path), logging.getLogger("mlflow.pyfunc")
    saved_level, bar = logger.level, os.environ.get(_PROGRESS_BAR)
    logger.setLevel(logging.WARNING)
    os.environ.setdefault(_PROGRESS_BAR, "false")
    try:
        yield
    finally:
        sys.path[:] = saved_path
        logger.setLevel(saved_level)
        if bar is None:
            os.environ.pop(_PROGRESS_BAR, None)
