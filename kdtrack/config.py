"""Frozen config dataclasses with defaults in code; YAML files and `--set a.b=value` hold overrides only."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdtrack.errors import ConfigError

SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="digits", metadata={"choices": ("digits", "synthetic", "manifest")})
    manifest: str = ""  # manifest JSON (source=manifest)
    root: str = ""  # data root the manifest's `file` paths are relative to; default: the manifest's folder
    index_splits: str = ""  # folder of <split>_indices.json re-splitting the source
    seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})  # split and synthetic generation seed
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    num_samples: int = 2000  # synthetic: labelled samples
    num_classes: int = 10  # synthetic
    # synthetic: the generated shape ((1, 8, 8) when empty); other sources: each sample read as this shape (same
    # number of values), e.g. [1, 40] for (40,) files; empty keeps the stored shape
    input_shape: tuple[int, ...] = ()
    unlabeled_samples: int = 0  # synthetic: extra samples in split `unlabeled`
    batch_size: int = field(default=64, metadata={"min": 1})
    eval_batch_size: int = field(default=512, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0})
    in_memory: bool = False  # manifest: read every file into RAM at start (epochs ~10x faster when the data fits)
    # fraction of train labels a student keeps; the rest become its unlabelled transfer set (teachers see all)
    student_labels: float = 1.0
    # training-batch augmentation ops, e.g. [crop(padding=4), flip, mixup(alpha=0.2)] (kdtrack.augment)
    augment: tuple[str, ...] = field(default=(), metadata={"check": "augment"})

    def __post_init__(self) -> None:
        if self.source == "synthetic" and not self.input_shape:
            object.__setattr__(self, "input_shape", (1, 8, 8))


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet8"  # mlp | cnn | resnet8/14/20/32/44/56/110 | resnet8x4 | resnet32x4
    hidden: tuple[int, ...] = field(default=(128,), metadata={"min": 1})  # mlp hidden widths
    channels: int = field(default=32, metadata={"min": 1})  # cnn base width
    dropout: float = 0.0  # mlp and cnn
    # cnn and resnets: 1d convolutions over (C, L) or (L,) samples, 2d over (C, H, W) or (H, W); auto: 1d for (L,)
    conv: str = field(default="auto", metadata={"choices": ("auto", "1d", "2d")})


@dataclass(frozen=True)
class OptimConfig:
    name: str = field(default="sgd", metadata={"choices": ("sgd", "adamw")})
    lr: float = field(default=0.05, metadata={"above": 0})
    momentum: float = field(default=0.9, metadata={"min": 0})
    weight_decay: float = field(default=5e-4, metadata={"min": 0})
    nesterov: bool = True
    epochs: int = field(default=30, metadata={"min": 1})
    schedule: str = field(default="cosine", metadata={"choices": ("cosine", "step", "none")})
    step_size: int = field(default=10, metadata={"min": 1})  # schedule=step
    gamma: float = 0.1  # schedule=step


@dataclass(frozen=True)
class TrainConfig:
    # auto: fp16 on CUDA, off on CPU
    amp: str = field(default="auto", metadata={"choices": ("auto", "off", "fp16", "bf16")})
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "max": 0.999})
    # auto: a progress bar only when attached to a terminal
    progress: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})


@dataclass(frozen=True)
class CacheConfig:
    dtype: str = field(default="float32", metadata={"choices": ("float32", "float16")})
    checkpoint: str = field(default="best", metadata={"choices": ("best", "last")})
    splits: tuple[str, ...] = ("train", "unlabeled")  # rows to cache; absent train/unlabeled splits are skipped
    split_files: tuple[str, ...] = ()  # <name>_indices.json files whose rows are cached as split <name>
    allow_splits: tuple[str, ...] = ()  # held-out splits (val, test, ...) that may be cached anyway
    batch_size: int = field(default=1024, metadata={"min": 1})
    chunk_rows: int = 0  # 0: about 4 MiB of logits per chunk
    # teacher re-run on this many random rows before the cache is marked complete
    verify_rows: int = field(default=64, metadata={"min": 1})
    # K > 0: cache the teacher on K augmented views of each row (data.augment's per-sample ops, drawn from
    # (view_seed, view, row)); a student then trains on the very views whose targets it reads
    views: int = field(default=0, metadata={"min": 0})
    # RAM a student may hold cached logits in, per process; 0: half the available memory over the processes of
    # this machine. A cache over it is read by whole chunks, and the student's rows are shuffled chunk-aware
    memory_budget_mb: float = field(default=0.0, metadata={"min": 0})
    view_seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})


@dataclass(frozen=True)
class KDConfig:
    temperature: float = field(default=4.0, metadata={"above": 0})
    # weight of the distillation term; CE gets 1 - alpha
    alpha: float = field(default=0.7, metadata={"min": 0, "max": 1})
    loss_type: str = field(default="kldiv", metadata={"choices": ("kldiv", "soft_ce")})
    weighting: str = field(default="none", metadata={"choices": ("none", "pmax", "threshold")})
    confidence_threshold: float = field(default=0.0, metadata={"min": 0, "max": 1})  # weighting=threshold
    warmup_epochs: int = field(default=0, metadata={"min": 0})  # epochs of CE only
    ramp_epochs: int = field(default=0, metadata={"min": 0})  # then alpha rises linearly over this many epochs
    fusion: str = field(default="mean", metadata={"choices": ("mean", "weighted", "most_confident")})
    fusion_weights: tuple[float, ...] = field(default=(), metadata={"min": 0})  # fusion=weighted, one per teacher
    domain: str = ""  # distil only on samples of this domain (CE stays on all)
    regression: str = field(default="none", metadata={"choices": ("none", "mse", "l1")})  # signal teachers
    # method=ft: pre-training of the paraphraser on the frozen teacher
    paraphraser_epochs: int = field(default=10, metadata={"min": 1})
    # an augmenting student may learn from a cache of clean-sample logits (targets of inputs it never sees)
    clean_targets: bool = False


@dataclass(frozen=True)
class StudentConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="mlp", hidden=(64,)))
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class Config:
    experiment: str = field(default="kdtrack", metadata={"nonempty": True})
    seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})  # numpy and torch take 0..2**64-1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    method: str = field(default="kd", metadata={"choices": ("none", "kd", "fitnet", "rkd", "ft", "at")})
    teacher_mode: str = field(default="cached", metadata={"choices": ("cached", "online")})
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = (), cls: type = Config) -> Any:
    """Defaults, then the YAML file at `path`, then `a.b=value` overrides, each checked against the types."""
    tree: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    _override_tree(tree, overrides)
    return _build(cls, tree, prefix="")


def override(cfg: Any, overrides: typing.Sequence[str]) -> Any:
    """`cfg` with `a.b=value` overrides applied and type-checked, as `load` does over the defaults."""
    return _build(type(cfg), _override_tree({}, overrides), prefix="", base=cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), for YAML and checkpoints."""
    return _plain(dataclasses.asdict(cfg))


def flatten(cfg: Any) -> dict[str, Any]:
    """`{"optim.lr": 0.05, ...}`: stable dotted names, one per leaf."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(to_dict(cfg), "")
    return flat


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `amp: off` stays the string "off"."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _override_tree(tree: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value", "write it as e.g. optim.lr=0.1")
        _set_path(tree, key.strip().split("."), _parse_scalar(raw))
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found", "pass an existing YAML file, e.g. experiments/digits.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a text file (byte {exc.start} is not UTF-8)",
                          "pass a YAML file of overrides, e.g. experiments/digits.yaml") from exc
    try:
        tree = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        if getattr(exc, "problem", None) == "found unhashable key":  # `? [a, b]`: a list or mapping as a key
            line = exc.problem_mark.line + 1
            raise ConfigError(f"config file {path} has a list or mapping as a key (line {line}), not a config key name",
                              _KEY_FIX) from exc
        raise ConfigError(f"config file {path} is not valid YAML ({exc.__class__.__name__})", "fix its syntax") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping", "write it as `section:` blocks of key: value")
    _check_keys(tree, path, "")
    return tree


_KEY_FIX = "keys are names, e.g. `optim:` then `  lr: 0.1`"


def _check_keys(tree: dict[Any, Any], path: Path, prefix: str) -> None:
    """Every key a name: YAML also allows numbers, nulls and lists as keys (`1: 2`, `? [a, b]`)."""
    for key, value in tree.items():
        if not isinstance(key, str):
            where = f"in section {prefix.rstrip('.')}" if prefix else "at the top level"
            raise ConfigError(f"config file {path} has the key {key!r} {where}, which is not a config key name",
                              _KEY_FIX)
        if isinstance(value, dict):
            _check_keys(value, path, f"{prefix}{key}.")


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _build(cls: type, tree: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """`base` (default: cls()) with the values of `tree` set; nested sections keep their own defaults."""
    base = cls() if base is None else base
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}",
            f"valid keys at {where}: {', '.join(fields)}",
        )
    values = {}
    for name, value in tree.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} is a section, not a value", f"set one of its keys, e.g. {prefix}{name}.<key>=...")
            values[name] = _build(hint, value, f"{prefix}{name}.", getattr(base, name))
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
            _check_value(values[name], fields[name], f"{prefix}{name}")
    return dataclasses.replace(base, **values)


def _check_value(value: Any, spec: dataclasses.Field, key: str) -> None:
    """The limits in a field's metadata: `choices`, `nonempty`, and bounds `min`, `max` (inclusive) and `above`
    (exclusive), which hold for every item of a tuple."""
    meta = spec.metadata
    if meta.get("check") == "augment" and value:
        from kdtrack import augment  # imports torch: only for a config that augments

        augment.parse(value, key)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed", f"choose one of: {', '.join(choices)}")
    if meta.get("nonempty") and not value.strip():
        raise ConfigError(f"{key} is empty", f"give it a name, e.g. --set {key}={spec.default}")
    lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
    if lo is None and hi is None and above is None:
        return
    default = f"[{','.join(map(str, spec.default))}]" if isinstance(spec.default, tuple) else spec.default
    example = f"e.g. --set {key}={default}" if spec.default != () else f"fix the values of {key}"
    for item in value if isinstance(value, tuple) else (value,):
        shown = f"{key}={list(value)!r} holds {item!r}, which" if isinstance(value, tuple) else f"{key}={item!r}"
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{shown} is not a finite number", example)
        if above is not None and item <= above:
            raise ConfigError(f"{shown} must be > {above}", example)
        if lo is not None and item < lo or hi is not None and item > hi:
            limit = f"must be >= {lo}" if hi is None else f"must be <= {hi}" if lo is None else f"is outside {lo}..{hi}"
            raise ConfigError(f"{shown} {limit}", example)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if value is None:  # `--set key=` or `key:` with nothing after it
        raise ConfigError(f"{key} is empty", f"give it a value, e.g. --set {key}={_example(hint)}")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(v, item_type, key) for v in items)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads 1e30 (no dot) as a string
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}",
        f"e.g. --set {key}={_example(hint)}",
    )


def _example(hint: type) -> str:
    return {int: "3", float: "0.1", bool: "true", str: "name"}.get(hint, "...")


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node
