"""Models defined outside kdtrack's zoo, and checkpoints written outside kdtrack.

A definition is `torchvision:<name>` or `timm:<name>` (built with random weights, never downloaded), or a user class
`package.module:Class` imported from the user's code and built with keyword arguments. Its code version (the
package's version, or the sha256 of the class's source file) is recorded with a registered teacher and checked
whenever the teacher is loaded again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtrack.errors import CheckpointError, ModelError

PACKAGES = ("torchvision", "timm")
_USER_CLASS = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_PACKAGE_MODEL = re.compile(r"^(torchvision|timm):[A-Za-z_][\w.]*$")
# Keys under which training scripts commonly nest a state dict, and the prefixes DDP and torch.compile add.
STATE_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")


def is_external(name: str) -> bool:
    """True for a definition of the forms `torchvision:<name>`, `timm:<name>` or `package.module:Class`."""
    return isinstance(name, str) and ":" in name


def check_definition(name: str) -> None:
    """Refuse a malformed definition, with the accepted forms."""
    if not (_PACKAGE_MODEL.match(name) or (_USER_CLASS.match(name) and name.split(":")[0] not in PACKAGES)):
        raise ModelError(f"model definition {name!r} is not of the form torchvision:<name>, timm:<name> or "
                         "package.module:Class", "e.g. --model torchvision:resnet18 or --model experts.nets:Expert")


def build(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """A fresh model of definition `name`: package models get `num_classes` and random weights; a user class gets
    exactly `kwargs`."""
    check_definition(name)
    where, target = name.split(":", 1)
    if where == "torchvision":
        models = _package("torchvision.models", "torchvision")
        if target not in models.list_models():
            raise ModelError(f"torchvision has no model {target!r}", "see torchvision.models.list_models()")
        return _construct(name, models.get_model, target, weights=None, num_classes=num_classes, **kwargs)
    if where == "timm":
        timm = _package("timm", "timm")
        if not timm.is_model(target):
            raise ModelError(f"timm has no model {target!r}", "see timm.list_models()")
        return _construct(name, timm.create_model, target, pretrained=False, num_classes=num_classes, **kwargs)
    model = _construct(name, user_class(name), **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name} built a {type(model).__name__}, not a torch.nn.Module",
                         "point --model at the nn.Module subclass itself")
    return model


def user_class(name: str) -> type:
    """The class of `package.module:Class`, imported as `python -m` would from the working directory."""
    module_name, class_name = name.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import {module_name} for model {name}: {exc}",
                         "run from the folder that holds the package, or add it to PYTHONPATH") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ModelError(f"module {module_name} ({module.__file__}) has no class {class_name}",
                         "check the class name after the colon")
    return cls


def code_root(name: str) -> Path | None:
    """The top-level package folder (or module file) a user class is imported from, to ship with an MLflow model;
    None for torchvision and timm models."""
    if name.split(":", 1)[0] in PACKAGES:
        return None
    top = importlib.import_module(name.split(":")[0].split(".")[0])
    source = Path(top.__file__)
    return source.parent if source.name == "__init__.py" else source


def code_version(name: str) -> str:
    """What the definition's code is now: `torchvision 0.28.0`, `timm 1.0.31`, or `sha256:<hex>` of the source
    file of a user class (its module's file)."""
    where = name.split(":", 1)[0]
    if where in PACKAGES:
        _package(where, where)
        return f"{where} {importlib.metadata.version(where)}"
    source = inspect.getsourcefile(user_class(name))
    if source is None:
        raise ModelError(f"the class of {name} has no source file to hash", "define it in a .py file")
    with open(source, "rb") as handle:
        return "sha256:" + hashlib.sha256(handle.read()).hexdigest()


def _package(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"model definitions {extra}:<name> need the {extra} package, which is not installed",
                         f"pip install 'kdtrack[{extra}]'") from exc
    except (RuntimeError, OSError) as exc:  # e.g. a torchvision wheel built for another torch (CUDA vs CPU)
        raise ModelError(f"{extra} is installed but cannot be imported with torch {torch.__version__}: "
                         f"{str(exc).splitlines()[0]}",
                         f"install the {extra} build made for this torch (for a CPU torch, the CPU wheel)") from exc


def _construct(name: str, factory: Any, *args: Any, **kwargs: Any) -> nn.Module:
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot build {name} with {kwargs}: {str(exc).splitlines()[0]}",
                         "check --model-kwargs against the model's constructor") from exc


def state_dict_of(payload: Any, path: str) -> dict[str, torch.Tensor]:
    """The model weights in a loaded checkpoint: the dict itself when every value is a tensor, else the dict under
    the first of `STATE_KEYS` it has; `PREFIXES` that every key carries are removed (repeatedly)."""
    state = payload
    if isinstance(payload, Mapping) and not _all_tensors(payload):
        nested = next((k for k in STATE_KEYS if isinstance(payload.get(k), Mapping)), None)
        if nested is None:
            raise CheckpointError(f"{path} holds no state dict: its keys are {_few(list(payload))}, none of them "
                                  f"{' / '.join(STATE_KEYS)} with the weights",
                                  "save the model's state_dict(), alone or under one of those keys")
        state = payload[nested]
    if not isinstance(state, Mapping) or not state or not _all_tensors(state):
        raise CheckpointError(f"{path} holds no state dict of tensors ({type(state).__name__})",
                              "save model.state_dict() with torch.save")
    state = dict(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, hint: str) -> None:
    """`model.load_state_dict(state)`, refused with one line naming the missing and unexpected keys, or the first
    layer whose shape differs (both shapes), instead of torch's wall of text."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match its architecture: {len(missing)} missing keys "
                              f"({_few(missing)}), {len(unexpected)} unexpected keys ({_few(unexpected)})", hint)
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{where}: layer {key} has shape {tuple(value.shape)} in the checkpoint but "
                                  f"{tuple(own[key].shape)} in the model", hint)
    model.load_state_dict(state)


def _all_tensors(d: Mapping[str, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(map(str, keys[:n])) + (", ..." if len(keys) > n else "") if keys else "none"
