"""Training-time augmentation: batched on the device, every random draw a pure function of (seed, tag, row).

`tag` is the epoch for a student's own augmentation, or a view number for a view-consistent cache, so a batch is
augmented the same way wherever and whenever it is replayed (a resumed run, another process, the cache builder
regenerating the input a teacher saw). Ops are given as strings, e.g. `data.augment=[crop(padding=4), flip]`:

- per sample: `crop(padding=P)` random crop of a zero-padded image, `flip` horizontal flip (p = 1/2),
  `shift(max=S, mode=circular|pad)` along the last axis, `gain(db=G)` times 10^(g/20) with g in [-G, G],
  `noise(std=S)` additive Gaussian, `time_mask(max=M)` and `freq_mask(max=M)` zero a band of up to M steps of the
  last and second-last axis;
- per batch: `mixup(alpha=A)` mixes each sample with a partner of the batch, inputs and targets with the same
  λ ~ Beta(A, A); `freq_mixstyle(alpha=A, p=P)` (for spectrograms (C, F, T)) mixes per-frequency statistics of
  partners, on a batch with probability P.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdtrack.errors import ConfigError

_MASK32 = 0xFFFFFFFF
# op name -> (parameter -> (default or None when required, check, what the check says))
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_PROBABILITY = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPS: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "crop": {"padding": (None, *_POSITIVE)},
    "flip": {},
    "shift": {"max": (None, *_POSITIVE), "mode": ("circular", lambda v: v in ("circular", "pad"), "circular or pad")},
    "gain": {"db": (None, *_POSITIVE)},
    "noise": {"std": (None, *_POSITIVE)},
    "time_mask": {"max": (None, *_POSITIVE)},
    "freq_mask": {"max": (None, *_POSITIVE)},
    "mixup": {"alpha": (None, *_POSITIVE)},
    "freq_mixstyle": {"alpha": (None, *_POSITIVE), "p": (0.5, *_PROBABILITY)},
}
BATCH_OPS = ("mixup", "freq_mixstyle")
_INT_PARAMS = {"padding", "max"}
_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class Op:
    """One augmentation op and its parameters, defaults filled in."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({inner})" if inner else self.name


def parse(specs: Sequence[str], where: str = "data.augment") -> tuple[Op, ...]:
    """The ops of `specs`, validated: a one-line ConfigError naming the op for anything unknown or out of range.
    Per-sample ops come before batch ops (mixup, freq_mixstyle), as they run."""
    ops = [_parse_one(spec, where) for spec in specs]
    names = [op.name for op in ops]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} lists {max(set(names), key=names.count)} twice", "give each op once")
    first_batch_op = next((i for i, n in enumerate(names) if n in BATCH_OPS), len(names))
    if any(n not in BATCH_OPS for n in names[first_batch_op:]):
        raise ConfigError(f"{where} lists a batch op ({', '.join(n for n in names if n in BATCH_OPS)}) before a "
                          "per-sample op", "put mixup and freq_mixstyle last: they mix augmented samples")
    return tuple(ops)


def _parse_one(spec: str, where: str) -> Op:
    match = _SPEC.match(str(spec))
    if not match or match.group(1) not in OPS:
        raise ConfigError(f"{where}: unknown augmentation {spec!r}",
                          f"choose from: {', '.join(OPS)}, e.g. crop(padding=4)")
    name, inner = match.group(1), match.group(2) or ""
    schema = OPS[name]
    given: dict[str, str] = {}
    for part in filter(None, re.split(r"[,\s]+", inner)):  # "a=1, b=2" or "a=1 b=2" (inside a YAML flow list)
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in schema:
            takes = ", ".join(schema) or "no parameters"
            raise ConfigError(f"{where}: {name} does not take {part!r} (it takes {takes})",
                              f"e.g. {name}({', '.join(f'{k}=...' for k in schema)})" if schema else f"write {name}")
        given[key] = value.strip()
    params = {}
    for key, (default, check, says) in schema.items():
        if key not in given:
            if default is None:
                raise ConfigError(f"{where}: {name} needs {key}", f"e.g. {name}({key}=...)")
            params[key] = default
            continue
        params[key] = _value(name, key, given[key], where)
        if not check(params[key]):
            raise ConfigError(f"{where}: {name} {key} must be {says}, got {given[key]}", f"fix {name}({key}=...)")
    return Op(name, params)


def _value(name: str, key: str, text: str, where: str) -> Any:
    if key == "mode":
        return text
    try:
        return int(text) if key in _INT_PARAMS else float(text)
    except ValueError:
        kind = "an integer" if key in _INT_PARAMS else "a number"
        raise ConfigError(f"{where}: {name} {key} must be {kind}, got {text!r}", f"fix {name}({key}=...)") from None


# ---------------------------------------------------------------- counter-based random numbers

def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2^32 for a in [0, 2^32): split in 16-bit halves so no int64 product overflows."""
    lo, hi = a & 0xFFFF, a >> 16
    return (lo * b + (((hi * b) & 0xFFFF) << 16)) & _MASK32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability about 1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hashed(seed: int, tag: int | torch.Tensor, rows: torch.Tensor, stream: int, count: int = 1) -> torch.Tensor:
    """(B, count) uint32 values (held in int64) that depend only on (seed, tag, row, stream, column). `tag` is one
    int for the batch (an epoch) or one per row (a view number each)."""
    key = 0x9E3779B9
    for word in (seed & _MASK32, (seed >> 32) & _MASK32, stream & _MASK32):
        key = int(_fmix(torch.tensor(key ^ int(_fmix(torch.tensor(word ^ 0x632BE59B))))))
    rows = rows.to(torch.int64).reshape(-1, 1)
    tags = torch.as_tensor(tag, dtype=torch.int64, device=rows.device).reshape(-1, 1)
    h = _fmix((rows & _MASK32) ^ key)
    for word, salt in ((rows >> 32, 0x85157AF5), (tags & _MASK32, 0x1B873593), (tags >> 32, 0xCC9E2D51)):
        h = _fmix(h ^ _fmix((word & _MASK32) ^ salt))
    columns = torch.arange(count, device=rows.device, dtype=torch.int64).reshape(1, -1)
    return _fmix(h ^ _fmix(columns ^ 0x2C1B3C6D))


def uniform(seed: int, tag: int | torch.Tensor, rows: torch.Tensor, stream: int, count: int = 1) -> torch.Tensor:
    """(B, count) float32 in [0, 1), 24 random bits each, from `hashed`."""
    return (hashed(seed, tag, rows, stream, count) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def normal(seed: int, tag: int | torch.Tensor, rows: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """(B, count) standard normal float32 (Box-Muller over two uniform streams)."""
    u1 = uniform(seed, tag, rows, stream, count).clamp_min(1.0 / (1 << 24))
    u2 = uniform(seed, tag, rows, stream + 1, count)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


# ---------------------------------------------------------------- the ops

@dataclass(frozen=True)
class Mix:
    """How a batch op paired the samples: sample i was mixed with `partner[i]` as λ·x_i + (1-λ)·x_partner."""

    partner: torch.Tensor  # (B,) int64, positions in the batch
    lam: torch.Tensor  # (B,) float32


class Augmenter:
    """Applies `ops` to training batches: `augment(x, rows, tag)` -> (x', Mix or None). `x` is the batch (B, *sample)
    on any device, `rows` the dataset rows of its samples."""

    def __init__(self, ops: Sequence[Op], seed: int) -> None:
        self.ops = tuple(ops)
        self.seed = int(seed)

    def __call__(self, x: torch.Tensor, rows: torch.Tensor, tag: int | torch.Tensor) -> tuple[torch.Tensor, Mix | None]:
        rows = rows.to(x.device)
        mix = None
        for stream, op in enumerate(self.ops):
            draw = _Draw(self.seed, tag, rows, stream * 8)
            if op.name == "mixup":
                x, mix = _mixup(x, rows, draw, op.params["alpha"], self.seed, tag)
            elif op.name == "freq_mixstyle":
                x = _freq_mixstyle(x, draw, op.params["alpha"], op.params["p"], self.seed, tag, rows)
            else:
                x = _SAMPLE_OPS[op.name](x, draw, **op.params)
        return x, mix


@dataclass(frozen=True)
class _Draw:
    seed: int
    tag: int | torch.Tensor
    rows: torch.Tensor
    stream: int

    def uniform(self, k: int = 0, count: int = 1) -> torch.Tensor:
        return uniform(self.seed, self.tag, self.rows, self.stream + k, count)

    def integers(self, low: int, high: int, k: int = 0) -> torch.Tensor:
        """(B,) ints in [low, high]."""
        return low + (self.uniform(k)[:, 0] * (high - low + 1)).long().clamp_max(high - low)


def _spatial(x: torch.Tensor, need: int, op: str) -> None:
    if x.dim() - 1 < need:
        raise ConfigError(f"augmentation {op} needs samples with at least {need} axes, got shape {tuple(x.shape[1:])}",
                          "drop the op, or use one made for this data (crop/flip: images; shift/masks: signals)")


def _crop(x: torch.Tensor, draw: _Draw, padding: int) -> torch.Tensor:
    _spatial(x, 2, "crop")
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy, dx = draw.integers(0, 2 * padding, 0), draw.integers(0, 2 * padding, 1)
    ys = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (B, H)
    xs = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (B, W)
    batch = torch.arange(x.shape[0], device=x.device)
    out = padded.movedim((-2, -1), (1, 2))  # (B, H+2p, W+2p, ...)
    out = out[batch[:, None, None], ys[:, :, None], xs[:, None, :]]  # (B, H, W, ...)
    return out.movedim((1, 2), (-2, -1)).contiguous()


def _flip(x: torch.Tensor, draw: _Draw) -> torch.Tensor:
    _spatial(x, 2, "flip")
    flip = (draw.uniform()[:, 0] < 0.5).view(-1, *[1] * (x.dim() - 1))
    return torch.where(flip, x.flip(-1), x)


def _shift(x: torch.Tensor, draw: _Draw, max: int, mode: str) -> torch.Tensor:  # noqa: A002 (the op's word)
    length = x.shape[-1]
    offset = draw.integers(-max, max)  # (B,)
    source = torch.arange(length, device=x.device)[None, :] - offset[:, None]  # (B, L): where each step comes from
    if mode == "circular":
        index, keep = source % length, None
    else:
        keep = (source >= 0) & (source < length)
        index = source.clamp(0, length - 1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (length,)
    out = torch.gather(x, -1, index.view(shape).expand_as(x))
    return out if keep is None else out * keep.view(shape).to(x.dtype)


def _gain(x: torch.Tensor, draw: _Draw, db: float) -> torch.Tensor:
    g = (draw.uniform()[:, 0] * 2 - 1) * db
    return x * torch.pow(10.0, g / 20).to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def _noise(x: torch.Tensor, draw: _Draw, std: float) -> torch.Tensor:
    n = x[0].numel()
    return x + std * normal(draw.seed, draw.tag, draw.rows, draw.stream, n).to(x.dtype).view_as(x)


def _band(x: torch.Tensor, draw: _Draw, max: int, axis: int) -> torch.Tensor:  # noqa: A002
    size = x.shape[axis]
    width = draw.integers(0, min(max, size))
    start = (draw.uniform(1)[:, 0] * (size - width + 1)).long().clamp_max(size - width)
    steps = torch.arange(size, device=x.device)[None, :]
    masked = (steps >= start[:, None]) & (steps < (start + width)[:, None])  # (B, size)
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[axis if axis > 0 else x.dim() + axis] = size
    return x * (~masked).view(shape).to(x.dtype)


def _time_mask(x: torch.Tensor, draw: _Draw, max: int) -> torch.Tensor:  # noqa: A002
    return _band(x, draw, max, -1)


def _freq_mask(x: torch.Tensor, draw: _Draw, max: int) -> torch.Tensor:  # noqa: A002
    _spatial(x, 2, "freq_mask")
    return _band(x, draw, max, -2)


_SAMPLE_OPS = {"crop": _crop, "flip": _flip, "shift": _shift, "gain": _gain, "noise": _noise,
               "time_mask": _time_mask, "freq_mask": _freq_mask}


def _batch_rng(seed: int, tag: int, rows: torch.Tensor, stream: int) -> np.random.Generator:
    """A generator for one batch op, keyed by the seed, the tag and the batch's rows (in order)."""
    key = hashed(seed, tag, rows, stream).reshape(-1).cpu().numpy().astype(np.uint64)
    return np.random.default_rng(np.random.SeedSequence([int(seed) & _MASK32, *key.tolist()]))


def _mixup(x: torch.Tensor, rows: torch.Tensor, draw: _Draw, alpha: float, seed: int,
           tag: int) -> tuple[torch.Tensor, Mix]:
    rng = _batch_rng(seed, tag, rows, draw.stream)
    partner = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=x.shape[0]).astype(np.float32)).to(x.device)
    weight = lam.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    return weight * x + (1 - weight) * x[partner], Mix(partner=partner, lam=lam)


def _freq_mixstyle(x: torch.Tensor, draw: _Draw, alpha: float, p: float, seed: int, tag: int,
                   rows: torch.Tensor) -> torch.Tensor:
    """Freq-MixStyle: per sample and frequency, mean and std over channels and time; the normalised spectrogram
    takes the λ-mix of its own and a partner's statistics. Samples are (C, F, T)."""
    _spatial(x, 3, "freq_mixstyle")
    rng = _batch_rng(seed, tag, rows, draw.stream)
    if rng.random() >= p:
        return x
    mean = x.mean(dim=(1, 3), keepdim=True)
    std = (x.var(dim=(1, 3), keepdim=True) + 1e-6).sqrt()
    partner = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=x.shape[0]).astype(np.float32)).to(x.device, x.dtype)
    lam = lam.view(-1, 1, 1, 1)
    mixed_mean = lam * mean + (1 - lam) * mean[partner]
    mixed_std = lam * std + (1 - lam) * std[partner]
    return (x - mean) / std * mixed_std + mixed_mean


def mix_targets(probs: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """Targets (B, ...) mixed as the inputs were: λ·p_i + (1-λ)·p_partner, on the targets' device."""
    if mix is None:
        return probs
    lam = mix.lam.to(probs.device, probs.dtype).view(-1, *[1] * (probs.dim() - 1))
    return lam * probs + (1 - lam) * probs[mix.partner.to(probs.device)]


class Augmented:
    """An engine loss whose training batches are augmented first: `x` replaced by the augmented batch (the epoch is
    the tag), and the Mix (or None) passed on as the batch's fifth item for the losses that mix their targets."""

    def __init__(self, loss: Any, augmenter: Augmenter) -> None:
        self.loss = loss
        self.augmenter = augmenter

    def __call__(self, model: torch.nn.Module, batch: Sequence[Any], epoch: int) -> tuple[torch.Tensor, dict]:
        x, mix = self.augmenter(batch[0], batch[2], epoch)
        return self.loss(model, (x, *batch[1:4], mix), epoch)


def training_loss(loss: Any, specs: Sequence[str], seed: int) -> Any:
    """`loss` augmenting its batches by `specs` (data.augment) with `seed`; `loss` itself when there are none."""
    return Augmented(loss, Augmenter(parse(specs), seed)) if specs else loss


def off_target_ops(specs: Sequence[str]) -> tuple[Op, ...]:
    """The ops of `specs` after which a sample's cached clean-input target no longer describes its input: all but
    mixup, which mixes the targets as it mixes the inputs."""
    return tuple(op for op in parse(specs) if op.name != "mixup")


# ---------------------------------------------------------------- view-consistent caches

VIEW_STREAM = 0x7E5  # the stream a student's per-epoch choice of view is drawn from


@dataclass(frozen=True)
class Views:
    """K augmented views per sample: view v of cache row r is the per-sample `ops` drawn with (seed, v, r)."""

    count: int
    seed: int
    ops: tuple[Op, ...]

    def to_attrs(self) -> dict[str, Any]:
        """What a store records (and its key holds): `{"count", "seed", "ops"}` with the ops as strings."""
        return {"count": self.count, "seed": self.seed, "ops": [str(op) for op in self.ops]}

    @classmethod
    def from_attrs(cls, attrs: Any) -> Views | None:
        """The views a store's `views` attribute describes; None for a clean-sample store."""
        if not attrs:
            return None
        return cls(int(attrs["count"]), int(attrs["seed"]), parse(attrs["ops"], "the store's views.ops"))

    def regenerate(self, x: torch.Tensor, cache_rows: torch.Tensor, view: int | torch.Tensor) -> torch.Tensor:
        """The input view `view` (one, or one per row) of each sample: what the teacher saw when it cached it."""
        return Augmenter(self.ops, self.seed)(x, cache_rows, view)[0]


def cache_views(specs: Sequence[str], count: int, seed: int) -> Views | None:
    """The views `cache.views=count` caches for `data.augment=specs`: its per-sample ops (batch ops are the
    student's, applied on top); None when count is 0."""
    if count == 0:
        return None
    ops = tuple(op for op in parse(specs) if op.name not in BATCH_OPS)
    if not ops:
        raise ConfigError(f"cache.views={count} needs per-sample ops in data.augment (got {list(specs) or 'none'})",
                          "e.g. --set 'data.augment=[crop(padding=4), flip]', or cache.views=0 for clean samples")
    return Views(count, seed, ops)


class ViewTeacher(torch.nn.Module):
    """A teacher's outputs on every view of each sample: `forward(x, rows)` -> (B, K, *output_shape), `rows` the
    cache rows of the batch. The cache writer, fidelity checks and the output-shape probe call it with rows."""

    takes_rows = True

    def __init__(self, teacher: torch.nn.Module, views: Views) -> None:
        super().__init__()
        self.teacher, self.views = teacher, views

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(x.device)
        return torch.stack([self.teacher(self.views.regenerate(x, rows, v)) for v in range(self.views.count)], dim=1)


def with_views(teacher: torch.nn.Module, views: Views | None) -> torch.nn.Module:
    """The model a cache of `views` runs: the teacher itself for clean samples."""
    return teacher if views is None else ViewTeacher(teacher, views)


def choose_views(seed: int, epoch: int, rows: torch.Tensor, count: int) -> torch.Tensor:
    """(B,) the view each sample of a student's batch takes this epoch: uniform over 0..count-1, by (seed, epoch,
    row)."""
    return (uniform(seed, epoch, rows, VIEW_STREAM)[:, 0] * count).long().clamp_max(count - 1)


class ViewAugmented:
    """A student's engine loss over a view-consistent cache: each sample becomes the view it draws this epoch
    (exactly the input its cached target came from), then the batch ops (mixup) act; the views go on as the batch's
    sixth item, for the teacher lookup."""

    def __init__(self, loss: Any, views: Views, batch_ops: Sequence[Op], seed: int,
                 cache_rows: Any) -> None:
        self.loss, self.views, self.seed = loss, views, int(seed)
        self.batch = Augmenter(batch_ops, seed)
        self.cache_rows = cache_rows  # dataset rows (B,) -> cache rows (B,)

    def __call__(self, model: torch.nn.Module, batch: Sequence[Any], epoch: int) -> tuple[torch.Tensor, dict]:
        rows = batch[2]
        view = choose_views(self.seed, epoch, rows, self.views.count).to(batch[0].device)
        x = self.views.regenerate(batch[0], self.cache_rows(rows), view)
        x, mix = self.batch(x, rows, epoch)
        return self.loss(model, (x, *batch[1:4], mix, view), epoch)
