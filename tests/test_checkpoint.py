"""Checkpoints: round trip, atomic writes, safe loading, hashes, and resume == uninterrupted training."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kdtrack import checkpoint
from kdtrack.config import OptimConfig
from kdtrack.engine import SupervisedLoss, fit
from kdtrack.errors import CheckpointError
from kdtrack.optim import build_optimizer, build_scheduler

SPEC = {"name": "tiny", "num_classes": 3, "input_shape": (4,)}
NORM = {"mean": [0.0, 0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0, 1.0]}


class EpochShuffle(Sampler[int]):
    """A permutation drawn from (seed, epoch) only, as a distributed sampler does."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def toy_loader(n: int = 48, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    y[::5] = -1  # some unlabelled rows
    data = TensorDataset(x, y, torch.arange(n), torch.zeros(n, dtype=torch.long))
    return DataLoader(data, batch_size=batch_size, sampler=EpochShuffle(n, seed=3))


def toy_parts(init_seed: int, cfg: OptimConfig):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    optimizer = build_optimizer(model.parameters(), cfg)
    return model, optimizer, build_scheduler(optimizer, cfg)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_restores_model_optimizer_scheduler_and_scaler(tmp_path: Path) -> None:
    cfg = OptimConfig(name="adamw", lr=0.01, schedule="step", step_size=1, gamma=0.5, epochs=5)
    model, optimizer, scheduler = toy_parts(0, cfg)
    fit(model, toy_loader(), optimizer, loss_fn=SupervisedLoss(), epochs=2, device=torch.device("cpu"),
        scheduler=scheduler)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    payload = checkpoint.make_payload(model=model, spec=SPEC, normalisation=NORM, epoch=1, metrics={"val/acc": 0.5},
                                      optimizer=optimizer, scheduler=scheduler, scaler=scaler, config={"seed": 1},
                                      extra={"run": "abc"})
    checkpoint.save(tmp_path / "last.pt", payload)

    loaded = checkpoint.load(tmp_path / "last.pt")
    assert {"state_dict", "spec", "num_classes", "input_shape", "normalisation", "epoch", "metrics", "optimizer",
            "lr_scheduler", "scaler", "config", "weights_sha256"} <= loaded.keys()
    assert (loaded["num_classes"], loaded["input_shape"], loaded["normalisation"]) == (3, [4], NORM)
    assert loaded["extra"] == {"run": "abc"} and loaded["metrics"] == {"val/acc": 0.5}

    model2, optimizer2, scheduler2 = toy_parts(99, cfg)
    scaler2 = torch.amp.GradScaler("cpu")
    assert not states_equal(model2.state_dict(), model.state_dict())
    assert checkpoint.restore(loaded, model=model2, optimizer=optimizer2, scheduler=scheduler2, scaler=scaler2) == 2
    assert states_equal(model2.state_dict(), model.state_dict())
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], optimizer2.state[p2]["exp_avg_sq"])
    assert scheduler2.last_epoch == 2 and optimizer2.param_groups[0]["lr"] == pytest.approx(0.0025)
    assert scaler2.get_scale() == 1024.0


def test_restore_without_optimizer_state_is_refused(tmp_path: Path) -> None:
    model, optimizer, _ = toy_parts(0, OptimConfig())
    payload = checkpoint.make_payload(model=model, spec=SPEC, normalisation=None, epoch=0, metrics={})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        checkpoint.restore(payload, model=model, optimizer=optimizer)
    wrong = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="do not fit the model"):
        checkpoint.restore(payload, model=wrong)


def test_make_payload_refuses_values_weights_only_cannot_load() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"\['extra'\]\['x'\] is a numpy"):
        checkpoint.make_payload(model=model, spec=SPEC, normalisation=None, epoch=0, metrics={},
                                extra={"x": np.float32(1.0)})
    with pytest.raises(CheckpointError, match="num_classes"):
        checkpoint.make_payload(model=model, spec={"input_shape": (4,)}, normalisation=None, epoch=0, metrics={})


def _old_payload(tmp_path: Path) -> tuple[Path, dict]:
    payload = checkpoint.make_payload(model=nn.Linear(4, 3), spec=SPEC, normalisation=None, epoch=0, metrics={})
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload)
    return path, payload


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = _old_payload(tmp_path)

    def half_write(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"epoch": 1})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    assert checkpoint.load(path)["weights_sha256"] == old["weights_sha256"]


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, old = _old_payload(tmp_path)
    renames = []

    def failing_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        checkpoint.save(path, {"epoch": 1})
    monkeypatch.undo()
    # The temp file sits next to the target, so the rename is atomic (same file system).
    assert renames[0][0].parent == path.parent and renames[0][1] == path
    assert os.listdir(tmp_path) == ["last.pt"]
    assert checkpoint.load(path)["weights_sha256"] == old["weights_sha256"]


class Evil:
    """Unpickling this would create `marker`: the canonical code-execution payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused as unsafe") as info:
        checkpoint.load(tmp_path / "evil.pt")
    assert "open" in str(info.value)
    assert not marker.exists()

    # A raw pickle (not a torch zip archive) is not even unpickled.
    with open(tmp_path / "raw.pt", "wb") as handle:
        pickle.dump(Evil(str(marker)), handle)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "raw.pt")
    assert not marker.exists()


def test_missing_truncated_and_tampered_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt not found"):
        checkpoint.load(tmp_path / "nope.pt")

    path, _ = _old_payload(tmp_path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "trunc.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "garbage.pt")

    tampered = checkpoint.load(path)
    tampered["state_dict"]["weight"][0, 0] += 1.0
    checkpoint.save(tmp_path / "tampered.pt", tampered)
    with pytest.raises(CheckpointError, match="weights hash"):
        checkpoint.load(tmp_path / "tampered.pt")


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="spec, num_classes, input_shape, normalisation, weights_sha256"):
        checkpoint.load(tmp_path / "partial.pt")
    assert checkpoint.load(tmp_path / "partial.pt", required=("state_dict",))["epoch"] == 3


def test_weights_sha256_identity() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3], dtype=torch.int64)}
    expected = hashlib.sha256(
        b"b\0" + b"torch.int64|(1,)\0" + np.array([3], np.int64).tobytes()
        + b"w\0" + b"torch.float32|(2,)\0" + np.array([1.0, 2.0], np.float32).tobytes()
    ).hexdigest()
    assert checkpoint.weights_sha256(a) == expected
    reordered = {"b": a["b"].clone(), "w": a["w"].clone()}
    assert checkpoint.weights_sha256(reordered) == expected
    changed = {"w": torch.tensor([1.0, float(np.nextafter(np.float32(2.0), np.float32(3.0)))]), "b": a["b"]}
    assert checkpoint.weights_sha256(changed) != expected
    assert checkpoint.weights_sha256({"w": a["w"].double(), "b": a["b"]}) != expected
    assert checkpoint.weights_sha256({"w": a["w"].reshape(2, 1), "b": a["b"]}) != expected
    transposed = torch.arange(6.0).reshape(3, 2).t()  # non-contiguous: hashed by value, not by storage
    assert checkpoint.weights_sha256({"t": transposed}) == checkpoint.weights_sha256({"t": transposed.contiguous()})
    # bfloat16 (which numpy has no dtype for) is hashed by its raw bytes too: 1.0 is 0x3F80, little-endian
    bf16 = hashlib.sha256(b"h\0" + b"torch.bfloat16|(2,)\0" + b"\x80\x3f" * 2).hexdigest()
    assert checkpoint.weights_sha256({"h": torch.ones(2, dtype=torch.bfloat16)}) == bf16


def test_file_sha256_streams(tmp_path: Path) -> None:
    data = os.urandom(1000)
    (tmp_path / "f").write_bytes(data)
    assert checkpoint.file_sha256(tmp_path / "f", chunk_bytes=7) == hashlib.sha256(data).hexdigest()


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = OptimConfig(name="sgd", lr=0.1, epochs=4, schedule="cosine")
    cpu, loss = torch.device("cpu"), SupervisedLoss(label_smoothing=0.1)

    straight, optimizer, scheduler = toy_parts(0, cfg)
    fit(straight, toy_loader(), optimizer, loss_fn=loss, epochs=4, device=cpu, scheduler=scheduler, seed=7)

    first, optimizer, scheduler = toy_parts(0, cfg)
    history = fit(first, toy_loader(), optimizer, loss_fn=loss, epochs=2, device=cpu, scheduler=scheduler, seed=7)
    checkpoint.save(tmp_path / "last.pt", checkpoint.make_payload(
        model=first, spec=SPEC, normalisation=None, epoch=1, metrics=history[-1],
        optimizer=optimizer, scheduler=scheduler))

    resumed, optimizer, scheduler = toy_parts(1234, cfg)  # fresh objects, different init
    start = checkpoint.restore(checkpoint.load(tmp_path / "last.pt"), model=resumed, optimizer=optimizer,
                               scheduler=scheduler)
    assert start == 2
    fit(resumed, toy_loader(), optimizer, loss_fn=loss, epochs=4, device=cpu, scheduler=scheduler, seed=7,
        start_epoch=start)

    assert not states_equal(first.state_dict(), straight.state_dict())  # the last two epochs did change it
    assert states_equal(resumed.state_dict(), straight.state_dict())
