"""Model zoo (CIFAR-style ResNets, a small CNN, an MLP) built from a ModelSpec that travels in checkpoints.

Every model lists in `feature_layers` the `named_modules()` names of its stage outputs, penultimate
embedding last, so feature-distillation losses hook them (`capture_features`) without touching `forward`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdtrack import external
from kdtrack.config import ModelConfig
from kdtrack.errors import ModelError

# name -> (BasicBlocks per stage, stem width, stage widths); depth = 6n + 2 (He et al. 2016, CIFAR variant).
# The x4 stems are 32 wide as in the CRD/mdistiller resnet8x4 and resnet32x4, so parameter counts match
# the published KD benchmarks (1.23M and 7.43M at 100 classes).
_RESNETS: dict[str, tuple[int, int, tuple[int, int, int]]] = {
    **{f"resnet{d}": ((d - 2) // 6, 16, (16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (1, 32, (64, 128, 256)),
    "resnet32x4": (5, 32, (64, 128, 256)),
}
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", *_RESNETS)

# Options each model takes from ModelConfig; anything else in a spec is refused.
_OPTIONS: dict[str, tuple[str, ...]] = {"mlp": ("hidden", "dropout"), "cnn": ("channels", "dropout", "conv"),
                                        **{name: ("conv",) for name in _RESNETS}}
_DEFAULTS = ModelConfig()


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an architecture; validated and completed with defaults on creation."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        outside = external.is_external(self.name)
        if outside:
            external.check_definition(self.name)
        elif self.name not in MODEL_NAMES:
            raise ModelError(f"unknown model {self.name!r}", f"choose one of: {', '.join(MODEL_NAMES)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ModelError(f"num_classes must be an int >= 2, got {self.num_classes!r}",
                             "check the dataset's labels; a classifier needs at least two classes")
        # A model from outside the zoo takes whatever input and keyword arguments its own code takes.
        object.__setattr__(self, "kwargs", dict(self.kwargs) if outside else _checked_options(self.name, self.kwargs))
        conv = self.kwargs.get("conv", "auto") if not outside else "auto"
        object.__setattr__(self, "input_shape", _checked_shape("mlp" if outside else self.name, self.input_shape,
                                                               conv=conv))

    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/float/list/dict form, loadable with `torch.load(weights_only=True)`."""
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs.items()}
        return {"name": self.name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "kwargs": options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_dict`; refuses a dict with missing or extra keys."""
        keys = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ModelError(f"model spec must have exactly the keys {sorted(keys)}, got {got}",
                             "save it with ModelSpec.to_dict() (re-save the checkpoint if it predates that)")
        return cls(name=d["name"], num_classes=d["num_classes"],
                   input_shape=tuple(d["input_shape"]), kwargs=dict(d["kwargs"]))


def spec_from_config(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...], *,
                     prefix: str = "model") -> ModelSpec:
    """ModelSpec for `cfg.name`, keeping only the config options that model uses.

    `prefix` is where `cfg` sits in the config, named in error hints: `model` (teacher) or `student.model`."""
    if cfg.name not in MODEL_NAMES:
        raise ModelError(f"unknown model {cfg.name!r}", f"set {prefix}.name to one of: {', '.join(MODEL_NAMES)}")
    options = {k: getattr(cfg, k) for k in _OPTIONS.get(cfg.name, ())}
    _checked_options(cfg.name, options, prefix)  # here first, so hints name `prefix`; ModelSpec re-checks
    _checked_shape(cfg.name, input_shape, prefix, conv=options.get("conv", "auto"))
    return ModelSpec(cfg.name, num_classes, tuple(input_shape), options)


def build_model(spec: ModelSpec) -> nn.Module:
    """Fresh model for `spec`, initialised from torch's global RNG; forward gives logits (B, num_classes)."""
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"build_model needs a ModelSpec, got {type(spec).__name__}",
                         "wrap a checkpoint's dict with ModelSpec.from_dict(d)")
    if external.is_external(spec.name):
        return external.build(spec.name, spec.num_classes, spec.kwargs)
    if spec.name == "mlp":
        return MLP(spec.num_classes, spec.input_shape, **spec.kwargs)
    if spec.name == "cnn":
        return SmallCNN(spec.num_classes, spec.input_shape, **spec.kwargs)
    blocks, stem, widths = _RESNETS[spec.name]
    return CifarResNet(spec.num_classes, spec.input_shape, blocks, stem, widths, **spec.kwargs)


def _checked_shape(name: str, shape: Any, prefix: str = "model", *, conv: str = "auto") -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ModelError(f"input shape must be a non-empty tuple of positive ints, got {shape!r}",
                         "pass the per-sample shape without the batch axis, e.g. (1, 8, 8) or (64,)")
    shape = tuple(shape)
    if name == "mlp":
        return shape
    if conv_dims(shape, conv) == 1 and len(shape) > 2:
        raise ModelError(f"{name} with 1d convolutions takes (C, L) or (L,) input, got {len(shape)}D input shape "
                         f"{shape}", f"use --set {prefix}.conv=2d for (C, H, W) maps")
    if conv_dims(shape, conv) == 2 and len(shape) == 1:
        raise ModelError(f"{name} with 2d convolutions needs a 2D feature map (C, H, W) or (H, W), got 1D input "
                         f"shape {shape}", f"use --set {prefix}.conv=1d (or auto) for signals and sequences")
    if len(shape) > 3:
        raise ModelError(f"{name} takes (C, H, W), (H, W), (C, L) or (L,) input, got {len(shape)}D input shape "
                         f"{shape}", f"fold the extra axes into channels, or use --set {prefix}.name=mlp")
    return shape


def conv_dims(shape: tuple[int, ...], conv: str) -> int:
    """1 or 2: the convolutions a conv net uses for samples of `shape` (conv "auto": 1d for (L,) only)."""
    return {"1d": 1, "2d": 2}.get(conv, 1 if len(shape) == 1 else 2)


def _checked_options(name: str, options: Any, prefix: str = "model") -> dict[str, Any]:
    allowed = _OPTIONS.get(name, ())
    if not isinstance(options, dict):
        raise ModelError(f"model kwargs must be a dict, got {type(options).__name__}", "pass e.g. {'dropout': 0.1}")
    extra = sorted(set(options) - set(allowed))
    if extra:
        takes = ", ".join(allowed) or "no options"
        raise ModelError(f"{name} does not take option {extra[0]!r} (it takes {takes})",
                         "build the spec with spec_from_config, which keeps only the options a model uses")
    full = {k: options.get(k, getattr(_DEFAULTS, k)) for k in allowed}
    if "hidden" in full:
        hidden = full["hidden"]
        if not isinstance(hidden, (tuple, list)) or not all(_positive_int(h) for h in hidden):
            raise ModelError(f"mlp hidden widths must be positive ints, got {hidden!r}",
                             f"e.g. --set {prefix}.hidden=[128,64]")
        full["hidden"] = tuple(hidden)
    if "channels" in full and not _positive_int(full["channels"]):
        raise ModelError(f"cnn channels must be a positive int, got {full['channels']!r}",
                         f"e.g. --set {prefix}.channels=32")
    if "conv" in full and full["conv"] not in ("auto", "1d", "2d"):
        raise ModelError(f"conv must be auto, 1d or 2d, got {full['conv']!r}", f"e.g. --set {prefix}.conv=1d")
    if "dropout" in full:
        p = full["dropout"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ModelError(f"dropout must be a probability in [0, 1), got {p!r}", f"e.g. --set {prefix}.dropout=0.1")
        full["dropout"] = float(p)
    return full


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class _ConvModel(nn.Module):
    """Shared input handling for conv nets: 2d convolutions over (C, H, W) samples ((H, W): one channel, added
    here), 1d convolutions over (C, L) samples ((L,): one channel). `conv` picks; auto is 1d for (L,) only."""

    def __init__(self, input_shape: tuple[int, ...], conv: str) -> None:
        super().__init__()
        self.dims = conv_dims(input_shape, conv)
        self.add_channel = len(input_shape) == self.dims
        self.in_channels = 1 if self.add_channel else input_shape[0]
        self.input_rank = len(input_shape)

    def _as_maps(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.input_rank + 1:
            raise ModelError(f"{type(self).__name__} expects a batch of rank {self.input_rank + 1}, "
                             f"got shape {tuple(x.shape)}", "feed (B, *input_shape) as in the model spec")
        return x.unsqueeze(1) if self.add_channel else x  # (B, C, H, W) or (B, C, L)


# The layers of a conv net for 1d or 2d convolutions; parameter names and shapes (but the kernel's) agree.
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVGPOOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _init_conv_bn(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _pool(dims: int) -> nn.Module:
    # A real submodule, so a hook on `pool` sees the (B, C) penultimate embedding for any map size >= 1.
    return nn.Sequential(_AVGPOOL[dims](1), nn.Flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 (or 3) conv-BN layers plus an identity or 1x1 conv-BN (option B) shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, dims: int = 2) -> None:
        super().__init__()
        conv, norm = _CONV[dims], _NORM[dims]
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        # Not in-place: whatever module a hook captures (even bn1) keeps its own output intact.
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(_ConvModel):
    """3x3 stem, three stages of `blocks` BasicBlocks (stride 1, 2, 2), global average pool, linear."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], blocks: int, stem: int,
                 widths: tuple[int, int, int], conv: str = "auto") -> None:
        super().__init__(input_shape, conv)
        self.stem = nn.Sequential(_CONV[self.dims](self.in_channels, stem, 3, 1, 1, bias=False),
                                  _NORM[self.dims](stem), nn.ReLU())
        self.layer1 = self._stage(stem, widths[0], blocks, 1, self.dims)
        self.layer2 = self._stage(widths[0], widths[1], blocks, 2, self.dims)
        self.layer3 = self._stage(widths[1], widths[2], blocks, 2, self.dims)
        self.pool = _pool(self.dims)
        self.fc = nn.Linear(widths[2], num_classes)
        self.feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "pool")
        self.apply(_init_conv_bn)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int, dims: int) -> nn.Sequential:
        first = BasicBlock(cin, cout, stride, dims)
        return nn.Sequential(first, *(BasicBlock(cout, cout, 1, dims) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._as_maps(x))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, widths[2], ceil(H/4), ceil(W/4)) or (..., ceil(L/4))
        return self.fc(self.pool(x))


class SmallCNN(_ConvModel):
    """Three conv-BN-ReLU-maxpool blocks (channels x1, x2, x4), global average pool, dropout, linear."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], channels: int, dropout: float,
                 conv: str = "auto") -> None:
        super().__init__(input_shape, conv)
        widths = (channels, 2 * channels, 4 * channels)
        self.block1 = self._block(self.in_channels, widths[0], self.dims)
        self.block2 = self._block(widths[0], widths[1], self.dims)
        self.block3 = self._block(widths[1], widths[2], self.dims)
        self.pool = _pool(self.dims)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[2], num_classes)
        self.feature_layers: tuple[str, ...] = ("block1", "block2", "block3", "pool")
        self.apply(_init_conv_bn)

    @staticmethod
    def _block(cin: int, cout: int, dims: int) -> nn.Sequential:
        # ceil_mode keeps a 1-pixel map at 1 pixel instead of pooling it away.
        return nn.Sequential(_CONV[dims](cin, cout, 3, 1, 1, bias=False), _NORM[dims](cout), nn.ReLU(),
                             _MAXPOOL[dims](2, ceil_mode=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self._as_maps(x))))
        return self.fc(self.dropout(self.pool(x)))


class MLP(nn.Module):
    """Flatten, then one Linear-ReLU(-Dropout) block per hidden width, then a linear classifier."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, ...],
                 dropout: float) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.flatten = nn.Flatten(1)
        width = math.prod(input_shape)
        blocks = []
        for h in hidden:
            drop = [nn.Dropout(dropout)] if dropout > 0 else []
            blocks.append(nn.Sequential(nn.Linear(width, h), nn.ReLU(), *drop))
            width = h
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, num_classes)
        # With no hidden layer the flattened input is the penultimate embedding.
        self.feature_layers: tuple[str, ...] = tuple(f"blocks.{i}" for i in range(len(hidden))) or ("flatten",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ModelError(f"mlp expects input (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}",
                             "rebuild the model with the data's input shape")
        return self.fc(self.blocks(self.flatten(x)))


@contextlib.contextmanager
def capture_features(model: nn.Module, names: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Hook `names` (default: model.feature_layers) and yield a dict that each forward fills with their outputs.

    Tensors keep their autograd graph (run a teacher under no_grad); the hooks are removed on exit. A model in
    DistributedDataParallel is hooked inside, by the names of the model it wraps.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    layers = tuple(getattr(model, "feature_layers", ()))
    names = layers if names is None else tuple(names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if not names or missing:
        raise ModelError(f"cannot hook {missing[0] if missing else 'no layers'!r} on {type(model).__name__}",
                         f"name modules of the model itself, e.g. its feature_layers: {', '.join(layers) or 'none'}")
    features: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise ModelError(f"module {name!r} returned {type(output).__name__}, not a tensor",
                                 "hook a module whose output is a single tensor")
            features[name] = output
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


def feature_shapes(model: nn.Module, input_shape: tuple[int, ...],
                   names: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of each feature layer, from one eval-mode forward of zeros (mode is restored)."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_features(model, names) as feats:
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return {name: tuple(t.shape[1:]) for name, t in feats.items()}
