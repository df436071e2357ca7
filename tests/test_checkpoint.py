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
    with pytest.raises(CheckpointError, match=r"^payload\['extra'\]\['x'\] is a numpy"):
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


def test_save_creates_missing_folders_and_fsyncs_file_then_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint lands in folders that do not exist yet; its bytes, then its folder's entry, reach the disk."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    checkpoint.save(path, {"epoch": 3})
    assert synced == [path.stat().st_ino, path.parent.stat().st_ino]
    assert checkpoint.load(path, required=("epoch",))["epoch"] == 3
    checkpoint.save(path, {"epoch": 4})  # the folders exist now: saving again is fine
    assert checkpoint.load(path, required=("epoch",))["epoch"] == 4


def test_the_temp_file_is_hidden_beside_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The half-written file is `.<name>.<random>.tmp` in the target's folder: no `*.pt` glob ever sees it."""
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save(tmp_path / "last.pt", {"epoch": 1})
    (temp,) = seen
    assert temp.parent == tmp_path and temp.name.startswith(".last.pt.") and temp.name.endswith(".tmp")
    assert len(temp.name) > len(".last.pt..tmp")


def test_an_interrupt_right_after_the_rename_keeps_the_new_file_and_propagates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving just after the rename: the temp file is already gone, the new checkpoint stands, and the
    KeyboardInterrupt itself (not a FileNotFoundError from the clean-up) reaches the caller."""
    path, _ = _old_payload(tmp_path)
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 7})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    assert checkpoint.load(path, required=("epoch",))["epoch"] == 7


def test_load_maps_tensors_to_map_location(tmp_path: Path) -> None:
    """Tensors land on `map_location` (the meta device here: no CPU tensor could pass for it)."""
    path, _ = _old_payload(tmp_path)
    payload = checkpoint.load(path, map_location="meta", verify=False)
    assert payload["state_dict"]["weight"].device.type == "meta"
    assert checkpoint.load(path)["state_dict"]["weight"].device.type == "cpu"


def test_unsafe_payload_is_refused_even_when_torch_is_told_to_unpickle_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch's own default off; kdtrack asks for weights_only explicitly."""
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": Evil(str(marker))}, tmp_path / "evil.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="refused as unsafe"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_an_unpickling_refusal_without_torchs_reason_gets_a_plain_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _old_payload(tmp_path)

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("unexpected opcode")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match=r"refused as unsafe: it holds objects other than tensors and plain "
                                              r"values — "):
        checkpoint.load(path)


def test_verify_false_skips_the_weights_hash(tmp_path: Path) -> None:
    """verify=False loads a file whose weights no longer match their recorded hash (the caller checks the file)."""
    path, _ = _old_payload(tmp_path)
    tampered = checkpoint.load(path)
    tampered["state_dict"]["weight"][0, 0] += 1.0
    checkpoint.save(tmp_path / "tampered.pt", tampered)
    loaded = checkpoint.load(tmp_path / "tampered.pt", verify=False)
    assert torch.equal(loaded["state_dict"]["weight"], tampered["state_dict"]["weight"])


@pytest.mark.parametrize("extra, where", [
    ({"xs": [1, (2.0, np.float32(3.0))]}, r"payload\['extra'\]\['xs'\]\[1\]\[1\] is a numpy\.float32"),
    ({"nested": {"x": np.int64(1)}}, r"payload\['extra'\]\['nested'\]\['x'\] is a numpy\.int64"),
    ({"by_pair": {(1, 2): 3}}, r"payload\['extra'\]\['by_pair'\] has a tuple key"),
])
def test_make_payload_names_where_a_value_is_not_plain(extra: dict, where: str) -> None:
    with pytest.raises(CheckpointError, match=where):
        checkpoint.make_payload(model=nn.Linear(4, 3), spec=SPEC, normalisation=None, epoch=0, metrics={},
                                extra=extra)
    ok = checkpoint.make_payload(model=nn.Linear(4, 3), spec=SPEC, normalisation=None, epoch=0, metrics={},
                                 extra={"xs": [1, (2.0, "a", None, True)], 7: {"n": b"x"}})
    assert ok["extra"] == {"xs": [1, (2.0, "a", None, True)], 7: {"n": b"x"}}


def test_make_payload_names_a_missing_input_shape() -> None:
    with pytest.raises(CheckpointError, match="model spec lacks 'input_shape'"):
        checkpoint.make_payload(model=nn.Linear(4, 3), spec={"num_classes": 3}, normalisation=None, epoch=0,
                                metrics={})


class Wrapper(nn.Module):
    """As DistributedDataParallel holds the model: `.module`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class Compiled(nn.Module):
    """As torch.compile's OptimizedModule holds the model: `._orig_mod`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_unwrap_peels_ddp_and_compile_wrappers_in_any_nesting() -> None:
    plain = nn.Linear(4, 3)
    assert checkpoint.unwrap(plain) is plain
    assert checkpoint.unwrap(Wrapper(plain)) is plain
    assert checkpoint.unwrap(Compiled(plain)) is plain
    assert checkpoint.unwrap(Compiled(Wrapper(plain))) is plain
    assert checkpoint.unwrap(Wrapper(Compiled(Wrapper(plain)))) is plain
    holder = nn.Linear(4, 3)
    holder.module = "not a module"  # an attribute of that name that is not a wrapped model
    assert checkpoint.unwrap(holder) is holder
    # the payload of a wrapped model is the plain model's: keys without a "module." prefix
    payload = checkpoint.make_payload(model=Wrapper(plain), spec=SPEC, normalisation=None, epoch=0, metrics={})
    assert sorted(payload["state_dict"]) == ["bias", "weight"]
    fresh = nn.Linear(4, 3)
    assert checkpoint.restore(payload, model=Compiled(fresh)) == 1
    assert torch.equal(fresh.weight, plain.weight)


def test_restore_scheduler_alone_and_scaler_state_without_a_scaler(tmp_path: Path) -> None:
    """A scheduler is restored even without an optimizer; a payload's scaler state needs no scaler to restore into;
    a scheduler with no saved state is refused by name."""
    cfg = OptimConfig(name="sgd", lr=0.1, schedule="step", step_size=1, gamma=0.5, epochs=5)
    model, optimizer, scheduler = toy_parts(0, cfg)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    payload = checkpoint.make_payload(model=model, spec=SPEC, normalisation=None, epoch=4, metrics={},
                                      scheduler=scheduler, scaler=scaler)
    model2, optimizer2, scheduler2 = toy_parts(1, cfg)
    assert checkpoint.restore(payload, model=model2, scheduler=scheduler2) == 5
    assert scheduler2.last_epoch == 2
    bare = checkpoint.make_payload(model=model, spec=SPEC, normalisation=None, epoch=0, metrics={})
    with pytest.raises(CheckpointError, match="no scheduler state"):
        checkpoint.restore(bare, model=model2, scheduler=scheduler2)


def test_file_sha256_reads_in_chunks_of_the_given_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1000 bytes in 7-byte reads: 143 reads with data and one empty read, never the whole file at once."""
    data = os.urandom(1000)
    (tmp_path / "f").write_bytes(data)
    sizes = []

    class Counted:
        def __init__(self, handle) -> None:
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def read(self, size=-1):
            sizes.append(size)
            return self.handle.read(size)

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: Counted(open(path, mode)), raising=False)
    assert checkpoint.file_sha256(tmp_path / "f", chunk_bytes=7) == hashlib.sha256(data).hexdigest()
    assert sizes == [7] * 144


def test_weights_sha256_counts_non_tensor_extra_state() -> None:
    """A non-tensor value is hashed as `<type name>|<repr>`: an int 3 and a str "3" differ."""
    expected = hashlib.sha256(b"n\0" + b"int|3\0").hexdigest()
    assert checkpoint.weights_sha256({"n": 3}) == expected
    assert checkpoint.weights_sha256({"n": "3"}) == hashlib.sha256(b"n\0" + b"str|'3'\0").hexdigest()


class AcceleratorTensor(torch.Tensor):
    """Stands in for a tensor on an accelerator: its bytes can be read only from a copy made with `.to("cpu")`."""

    def to(self, *args, **kwargs):
        if args == ("cpu",) and not kwargs:
            return self.as_subclass(torch.Tensor).clone()
        return self

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert an accelerator tensor to numpy: copy it to the CPU first")


def test_weights_sha256_of_tensors_on_another_device_equals_the_cpu_hash() -> None:
    w = torch.tensor([1.0, 2.0])
    expected = hashlib.sha256(b"w\0" + b"torch.float32|(2,)\0" + np.array([1.0, 2.0], np.float32).tobytes()).hexdigest()
    assert checkpoint.weights_sha256({"w": w.as_subclass(AcceleratorTensor)}) == expected
