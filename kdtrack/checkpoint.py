"""Checkpoints: atomic save, safe load (`weights_only=True`), content hashes, and training-state restore.

A checkpoint is a plain dict of tensors and plain Python values, so it loads without unpickling code.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtrack.errors import CheckpointError

FORMAT = "kdtrack.checkpoint/1"
# What a consumer of a model checkpoint (cache building, evaluation) needs; training state is optional.
REQUIRED_KEYS = ("state_dict", "spec", "num_classes", "input_shape", "normalisation", "epoch", "weights_sha256")

_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype)


def save(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write `payload` to `path` atomically: a crash mid-write leaves the old file (or none), never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave a stray temp file behind.
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    required: Sequence[str] = REQUIRED_KEYS,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; check `required` keys and, if `verify`, the weights hash.

    Raises CheckpointError when the file is missing, corrupt, refused as unsafe, or incomplete.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found", "check the path or the run's checkpoints/ artifacts")
    # torch.save always writes a zip archive; anything else is truncated or foreign and is never unpickled.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (not a torch.save zip archive)",
            "re-download it or re-create it from its training run",
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} was refused as unsafe: {_refusal_reason(exc)}",
            "only load checkpoints written by kdtrack; never allowlist globals for a file you did not write",
        ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})",
            "re-download it or re-create it from its training run",
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint dict",
            "save checkpoints with kdtrack.checkpoint.save(path, make_payload(...))",
        )
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks required keys: {', '.join(missing)}",
            "save it with kdtrack.checkpoint.make_payload, which writes every key",
        )
    if verify and payload.get("weights_sha256") is not None:
        actual = weights_sha256(payload["state_dict"])
        if actual != payload["weights_sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: weights hash {actual[:12]} "
                f"!= recorded {payload['weights_sha256'][:12]}",
                "re-download it or re-create it from its training run",
            )
    return payload


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """sha256 over sorted keys, dtype, shape and raw bytes: equal weights hash equally on any device, in any order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
            # Viewing as bytes works for every dtype, bfloat16 included (which .numpy() rejects).
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            # Non-tensor extra state (rare) still has to count towards identity.
            digest.update(f"{type(value).__name__}|{value!r}\0".encode())
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def make_payload(
    *,
    model: nn.Module,
    spec: Mapping[str, Any],
    normalisation: Mapping[str, Any] | None,
    epoch: int,
    metrics: Mapping[str, float],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a checkpoint dict that loads under `weights_only=True`; `epoch` is the last finished epoch."""
    for key in ("num_classes", "input_shape"):
        if key not in spec:
            raise CheckpointError(f"model spec lacks {key!r}", "include num_classes and input_shape in the spec dict")
    state_dict = unwrap(model).state_dict()
    payload = {
        "format": FORMAT,
        "state_dict": state_dict,
        "spec": dict(spec),
        "num_classes": int(spec["num_classes"]),
        "input_shape": [int(d) for d in spec["input_shape"]],
        "normalisation": dict(normalisation) if normalisation is not None else None,
        "epoch": int(epoch),
        "metrics": {str(k): float(v) for k, v in metrics.items()},  # numpy scalars would be refused on load
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": dict(config) if config is not None else None,
        "extra": dict(extra) if extra is not None else {},
        "weights_sha256": weights_sha256(state_dict),
    }
    _check_plain(payload, "payload")
    return payload


def restore(
    payload: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> int:
    """Load model (strictly) and any given training state from `payload`; return the next epoch to run."""
    try:
        unwrap(model).load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint weights do not fit the model ({str(exc).splitlines()[0][:160]})",
            "build the model from the checkpoint's own spec (payload['spec'])",
        ) from exc
    for name, obj, key in (("optimizer", optimizer, "optimizer"), ("scheduler", scheduler, "lr_scheduler")):
        if obj is None:
            continue
        if payload.get(key) is None:
            raise CheckpointError(
                f"checkpoint has no {name} state, so training cannot resume from it",
                "resume from last.pt of the same run, or start a fresh run",
            )
        obj.load_state_dict(payload[key])
    # AMP may legitimately differ between runs (e.g. resumed on another device): a fresh scaler is fine.
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    return int(payload["epoch"]) + 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a {type(key).__name__} key", "use str or int keys only")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}, which weights_only loading refuses",
            "store only tensors and plain Python values (convert e.g. numpy scalars with float())",
        )


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    match = re.search(r"WeightsUnpickler error: (.+?\.)(?:\s|$)", str(exc))
    return match.group(1) if match else "it holds objects other than tensors and plain values"


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
