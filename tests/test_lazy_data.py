"""Lazy, file-backed manifests: same rows and digest as eager loading, the content-hash sidecar, readers for
images and audio, data.input_shape, bulk path checks, and flat memory; every fixture is written under tmp_path."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from kdtrack.config import DataConfig
from kdtrack.data import (build_dataset, dataset_digest, distillation_rows, fit_normalisation, load_manifest,
                          make_loader)
from kdtrack.data import readers
from kdtrack.errors import DataError

# The fixture of tests/test_data.py `write_manifest`; its digests were computed by the eager loader as it was
# before datasets could be lazy, and existing caches are keyed by them.
ARRAYS = {
    "a/0.npy": np.arange(6, dtype=np.float32).reshape(2, 3),
    "a/1.npy": np.full((2, 3), 7.0),
    "b/2.npy": -np.ones((2, 3), dtype=np.int16),
    "b/3.npy": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
}
ENTRIES = [
    {"file": "a/0.npy", "label": "dog", "split": "train", "domain": "studio", "city": "Oslo"},
    {"file": "./a//1.npy", "label": 2, "split": "train", "device": "phone"},
    {"file": "b/2.npy", "label": 0, "split": "calib"},
    {"file": "b/3.npy", "label": None, "split": "unlabeled", "device": "phone"},
]
PINNED_DIGEST = "731d46b14814826c847406f73f613dd36669f0edd63e11c32d978bb4ba5537df"
PINNED_TRAIN_DIGEST = "d251cd032aa2c7eb4220e01a0db78120d279d5742e3ce55bc821ffea79314384"


def write_fixture(folder: Path) -> Path:
    for name, arr in ARRAYS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / name, arr)
    path = folder / "manifest.json"
    path.write_text(json.dumps({"classes": ["cat", "dog", "emu"], "splits": ["calib"], "samples": ENTRIES}))
    return path


def write_arrays(folder: Path, arrays: list[np.ndarray], suffix: str = ".npy") -> Path:
    """One file per array, `s/<i>.npy`, all in split train with label i % 2."""
    (folder / "s").mkdir(parents=True, exist_ok=True)
    samples = []
    for i, arr in enumerate(arrays):
        np.save(folder / "s" / f"{i}.npy", arr)
        samples.append({"file": f"s/{i}.npy", "label": i % 2, "split": "train"})
    path = folder / "manifest.json"
    path.write_text(json.dumps({"num_classes": 2, "samples": samples}))
    return path


def plain_digest(ids: list[str], labels: list[int], splits: list[str], arrays: list[np.ndarray],
                 shape: tuple[int, ...]) -> str:
    outer = hashlib.sha256(f"kdtrack.dataset-digest/1\0{shape}\0{len(ids)}\n".encode())
    for sid, label, split, arr in zip(ids, labels, splits, arrays):
        outer.update(f"{sid}\0{label}\0{split}\0".encode())
        outer.update(hashlib.sha256(np.asarray(arr, dtype="<f4").tobytes()).digest())
    return outer.hexdigest()


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the .npy files read from now on, in order."""
    seen: list[str] = []
    inner = readers.READERS[".npy"]

    def counting(path: str, where: str) -> np.ndarray:
        seen.append(os.path.basename(path))
        return inner(path, where)

    monkeypatch.setitem(readers.READERS, ".npy", counting)
    return seen


# ---------------------------------------------------------------- same rows, same digest


def test_lazy_and_eager_give_the_same_rows_and_the_pinned_digest(tmp_path: Path, reads: list[str]) -> None:
    path = write_fixture(tmp_path)
    lazy, eager = load_manifest(path), load_manifest(path, lazy=False)
    assert lazy.lazy and not eager.lazy and reads.count("0.npy") == 2 and len(reads) == 5  # lazy read one file
    reads.clear()
    expected = np.stack([np.asarray(a, dtype=np.float32) for a in ARRAYS.values()])
    for ds in (lazy, eager):
        assert ds.sample_ids == ["a/0.npy", "a/1.npy", "b/2.npy", "b/3.npy"] and ds.input_shape == (2, 3)
        assert ds.labels.tolist() == [1, 2, 0, -1] and ds.splits.tolist() == ["train", "train", "calib", "unlabeled"]
        np.testing.assert_array_equal(ds.arrays([3, 0]), expected[[3, 0]])
        np.testing.assert_array_equal(ds.features, expected)
        x, y, row, domain = ds.batch([2, 1])
        assert torch.equal(x, torch.from_numpy(expected[[2, 1]])) and y.tolist() == [0, 2] and row.tolist() == [2, 1]
        assert torch.equal(ds[1][0], torch.from_numpy(expected[1])) and ds[1][1:] == (2, 1, eager[1][3])
    assert len(reads) == 2 + 4 + 2 + 2  # the lazy dataset reads its files at each access
    splits = ["train", "train", "calib", "unlabeled"]
    want = plain_digest(lazy.sample_ids, [1, 2, 0, -1], splits, list(expected), (2, 3))
    assert dataset_digest(lazy) == dataset_digest(eager) == want == PINNED_DIGEST
    train = lazy.select(["train"])
    assert dataset_digest(train) == dataset_digest(eager.select(["train"])) == PINNED_TRAIN_DIGEST
    assert dataset_digest(lazy.take(np.array([3, 1]))) == dataset_digest(eager.take(np.array([3, 1])))


def test_data_in_memory_reads_every_file_at_start_and_gives_the_same_dataset(tmp_path: Path,
                                                                            reads: list[str]) -> None:
    path = write_fixture(tmp_path)
    lazy = build_dataset(DataConfig(source="manifest", manifest=str(path)))
    reads.clear()
    eager = build_dataset(DataConfig(source="manifest", manifest=str(path), in_memory=True))
    assert lazy.lazy and not eager.lazy and sorted(reads) == ["0.npy", "1.npy", "2.npy", "3.npy"]
    reads.clear()
    expected = np.stack([np.asarray(a, dtype=np.float32) for a in ARRAYS.values()])
    np.testing.assert_array_equal(eager.batch([3, 0])[0].numpy(), expected[[3, 0]])
    assert reads == [] and dataset_digest(eager) == dataset_digest(lazy) == PINNED_DIGEST


def test_selection_and_normalisation_of_a_lazy_dataset_match_eager(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = [rng.normal(50.0, 7.0, size=(3, 5)) for _ in range(9)]
    path = write_arrays(tmp_path, arrays)
    lazy, eager = load_manifest(path), load_manifest(path, lazy=False)
    norm = fit_normalisation(lazy)  # from the sidecar's per-file sums, no array of all samples
    values = np.stack(arrays).astype(np.float32).astype(np.float64)
    assert norm.mean == pytest.approx(values.mean(), rel=1e-12)
    assert norm.std == pytest.approx(values.std(), rel=1e-12)
    eager_norm = fit_normalisation(eager)
    assert (norm.mean, norm.std) == pytest.approx((eager_norm.mean, eager_norm.std), rel=1e-12)
    moved = lazy.with_splits(np.array(["train", "unlabeled", "test"] * 3))
    chosen = distillation_rows(moved, ["train", "unlabeled"])
    assert chosen.lazy and chosen.sample_ids == [f"s/{i}.npy" for i in (0, 1, 3, 4, 6, 7)]
    np.testing.assert_array_equal(chosen.arrays(np.arange(6)), values[[0, 1, 3, 4, 6, 7]].astype(np.float32))
    (tmp_path / "tune_indices.json").write_text("[8, 2]")
    joined = distillation_rows(moved, ["train"], allow=["tune"], split_files=[str(tmp_path / "tune_indices.json")])
    assert joined.lazy and joined.sample_ids == [f"s/{i}.npy" for i in (0, 3, 6, 2, 8)]
    assert joined.splits.tolist() == ["train"] * 3 + ["tune"] * 2
    np.testing.assert_array_equal(joined.arrays(np.arange(5)), values[[0, 3, 6, 2, 8]].astype(np.float32))


@pytest.mark.slow  # starts two DataLoader worker processes
def test_loader_with_workers_yields_the_eager_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    path = write_arrays(tmp_path, [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(23)])
    lazy, eager = load_manifest(path), load_manifest(path, lazy=False)
    norm = fit_normalisation(eager)
    fast = make_loader(eager.with_normalisation(norm), 5, shuffle=True, seed=2)
    slow = make_loader(lazy.with_normalisation(norm), 5, shuffle=True, seed=2, num_workers=2)
    assert slow.persistent_workers
    for epoch in (0, 1):
        fast.sampler.set_epoch(epoch)
        slow.sampler.set_epoch(epoch)
        for got, want in zip(slow, fast, strict=True):
            for a, b in zip(got, want):
                assert torch.equal(a, b)


@pytest.mark.slow  # starts two DataLoader worker processes
def test_a_cache_of_lazy_data_is_read_by_workers_and_equals_the_eager_build(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """cache.build reads a lazy dataset's files in DataLoader workers (every file, none in this process after the
    one-row probe), and the store holds what the eager dataset's build holds: the model's outputs on each row."""
    from cache_build_child import tiny_attrs

    from kdtrack.cache import build

    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(45)]
    path = write_arrays(tmp_path, arrays)
    norm = fit_normalisation(load_manifest(path, lazy=False))
    lazy, eager = (load_manifest(path, lazy=lazy).with_normalisation(norm) for lazy in (True, False))
    log, inner = tmp_path / "reads.log", readers.READERS[".npy"]

    def logged(file: str, where: str) -> np.ndarray:
        with open(log, "a") as out:  # one line per read, from whichever process reads
            out.write(f"{os.getpid()} {os.path.basename(file)}\n")
        return inner(file, where)

    monkeypatch.setitem(readers.READERS, ".npy", logged)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
    for ds, name, workers in ((lazy, "lazy.zarr", 2), (eager, "eager.zarr", 0)):
        attrs = tiny_attrs(ds, (3,))  # the digest reads (or looks up) every file
        log.write_text("")
        build(tmp_path / name, model, ds, attrs=attrs, device=torch.device("cpu"), batch_size=4, chunk_rows=16,
              progress=False, num_workers=workers)
        if ds is lazy:
            reads = [line.split() for line in log.read_text().splitlines()]
            here = [f for pid, f in reads if int(pid) == os.getpid()]
            assert here == ["0.npy"]  # the output-shape probe
            assert sorted(f for pid, f in reads if int(pid) != os.getpid()) == sorted(f"{i}.npy" for i in range(45))
    got = [np.asarray(zarr.open_group(tmp_path / name, mode="r")["logits"][:]) for name in ("lazy.zarr", "eager.zarr")]
    assert got[0].tobytes() == got[1].tobytes()
    with torch.no_grad():
        x = (np.stack(arrays).reshape(45, 8) - norm.mean) / norm.std
        by_hand = x @ model[1].weight.numpy().T + model[1].bias.numpy()
    np.testing.assert_allclose(got[0], by_hand, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the content-hash sidecar


def test_sidecar_rereads_only_files_whose_size_or_mtime_changed(tmp_path: Path, reads: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_fixture(tmp_path)
    sidecar = tmp_path / ".manifest.json.kdtrack-hashes.json"
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and len(reads) == 5 and sidecar.is_file()
    assert json.loads(sidecar.read_text())["format"] == "kdtrack.content-hashes/1"
    reads.clear()
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and reads == ["0.npy"]  # the shape probe only

    target = tmp_path / "b" / "3.npy"
    before = target.stat()
    np.save(target, np.linspace(0, 1, 6, dtype=np.float64).reshape(2, 3))  # same values, new size ...
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... under the old mtime
    reads.clear()
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and reads == ["0.npy", "3.npy"]

    os.utime(tmp_path / "a" / "1.npy", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # mtime only
    reads.clear()
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and reads == ["0.npy", "1.npy"]

    # the documented trade-off: new content of the same size under the same mtime goes unseen ...
    changed = tmp_path / "a" / "1.npy"
    kept = changed.stat()
    np.save(changed, np.full((2, 3), 8.0))
    os.utime(changed, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert changed.stat().st_size == kept.st_size
    reads.clear()
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and reads == ["0.npy"]
    # ... until every file is re-read, by argument (verify-cache) or by KDTRACK_REHASH=1
    fresh = dataset_digest(load_manifest(path), recompute=True)
    assert fresh != PINNED_DIGEST and len(reads) == 1 + 1 + 4
    arrays = [np.asarray(a, dtype=np.float32) for a in ARRAYS.values()]
    arrays[1] = np.full((2, 3), 8.0, dtype=np.float32)
    ds = load_manifest(path)
    assert fresh == plain_digest(ds.sample_ids, ds.labels.tolist(), ds.splits.tolist(), arrays, (2, 3))
    assert dataset_digest(ds) == fresh  # the rewritten sidecar holds the new hash
    reads.clear()
    monkeypatch.setenv("KDTRACK_REHASH", "1")
    assert dataset_digest(load_manifest(path)) == fresh and len(reads) == 1 + 4


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"format": "kdtrack.content-hashes/1", "root": "%s", '
                                     '"files": {"a/0.npy": [1, 2, [2, 3], "zz", 0.0, 0.0]}}'])
def test_corrupt_sidecar_is_ignored_and_rewritten(tmp_path: Path, reads: list[str], garbage: str) -> None:
    path = write_fixture(tmp_path)
    sidecar = tmp_path / ".manifest.json.kdtrack-hashes.json"
    sidecar.write_text(garbage.replace("%s", str(tmp_path.resolve())))
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and len(reads) == 5
    doc = json.loads(sidecar.read_text())
    assert sorted(doc["files"]) == ["a/0.npy", "a/1.npy", "b/2.npy", "b/3.npy"]
    assert doc["files"]["a/0.npy"][3] == hashlib.sha256(ARRAYS["a/0.npy"].tobytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left behind
    reads.clear()
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and reads == ["0.npy"]


def test_sidecar_goes_under_the_cache_dir_when_the_manifest_folder_is_not_writable(
        tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_fixture(tmp_path / "data")
    (tmp_path / "data" / ".manifest.json.kdtrack-hashes.json").mkdir()  # cannot be replaced by a file
    monkeypatch.setenv("KDTRACK_CACHE_DIR", str(tmp_path / "cache"))
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST
    written = list((tmp_path / "cache" / "content-hashes").glob("*.json"))
    assert len(written) == 1 and len(json.loads(written[0].read_text())["files"]) == 4
    reads.clear()
    assert dataset_digest(load_manifest(path)) == PINNED_DIGEST and reads == ["0.npy"]


def test_a_cached_shape_that_differs_is_still_refused(tmp_path: Path) -> None:
    path = write_fixture(tmp_path)
    dataset_digest(load_manifest(path))
    sidecar = tmp_path / ".manifest.json.kdtrack-hashes.json"
    doc = json.loads(sidecar.read_text())
    doc["files"]["b/2.npy"][2] = [3, 2]
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="entry 2 \\('b/2.npy'\\) has feature shape \\(3, 2\\) but manifest entry 0"):
        dataset_digest(load_manifest(path))


# ---------------------------------------------------------------- paths in bulk


def test_paths_are_checked_in_bulk_and_symlinked_folders_cannot_escape(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_arrays(tmp_path, [np.zeros(3, dtype=np.float32)] * 200)
    resolved: list[Path] = []
    inner = Path.resolve

    def counting(self: Path, strict: bool = False) -> Path:
        resolved.append(self)
        return inner(self, strict)

    monkeypatch.setattr(Path, "resolve", counting)
    assert len(load_manifest(path)) == 200 and len(resolved) <= 3  # the root and the one folder, not 200 files
    monkeypatch.setattr(Path, "resolve", inner)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    np.save(outside / "x.npy", np.zeros(3, dtype=np.float32))
    os.symlink(outside, tmp_path / "via")
    doc = json.loads(path.read_text())
    doc["samples"][5]["file"] = "via/x.npy"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="entry 5 \\('via/x.npy'\\) points outside the data root"):
        load_manifest(path)


# ---------------------------------------------------------------- images and audio


def test_png_jpg_and_wav_samples_load_channels_first(tmp_path: Path) -> None:
    from PIL import Image
    from scipy.io import wavfile

    gray = (np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    rgb = np.arange(36, dtype=np.uint8).reshape(3, 4, 3) * 7
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.full((3, 4, 3), 200, dtype=np.uint8)).save(tmp_path / "c.jpg", quality=95)
    mono = np.array([0, 1000, -1000, 32767, -32768], dtype=np.int16)
    stereo = np.stack([mono, mono // 2], axis=1)  # (L, C)
    wavfile.write(tmp_path / "m.wav", 8000, mono)
    wavfile.write(tmp_path / "s.wav", 8000, stereo)

    def one(name: str) -> np.ndarray:
        (tmp_path / "m.json").write_text(json.dumps([{"file": name, "label": 0, "split": "train"}]))
        return load_manifest(tmp_path / "m.json").arrays([0])[0]

    np.testing.assert_array_equal(one("g.png"), gray[None].astype(np.float32))
    np.testing.assert_array_equal(one("c.png"), np.moveaxis(rgb, 2, 0).astype(np.float32))
    jpg = one("c.jpg")
    assert jpg.shape == (3, 3, 4) and np.abs(jpg - 200).max() <= 3  # lossy, but close
    np.testing.assert_array_equal(one("m.wav"), mono[None].astype(np.float32))
    np.testing.assert_array_equal(one("s.wav"), np.stack([mono, mono // 2]).astype(np.float32))


def test_npy_files_sharing_a_header_read_as_numpy_loads_them(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    arrays = [np.asfortranarray(base + i) for i in range(3)] + [(base * 2).astype(">i4")] * 2
    path = write_arrays(tmp_path, [arrays[0], arrays[1], arrays[2], arrays[3], arrays[4]])
    ds = load_manifest(path)
    for i in range(5):  # files 1, 2 and 4 reuse a header seen before
        np.testing.assert_array_equal(ds.arrays([i])[0], np.load(tmp_path / "s" / f"{i}.npy").astype(np.float32))
    cut = (tmp_path / "s" / "2.npy").read_bytes()[:-8]
    (tmp_path / "s" / "2.npy").write_bytes(cut)  # same header, payload short by one value
    with pytest.raises(DataError, match="entry 2 \\('s/2.npy'\\) is not a readable .npy array"):
        ds.arrays([2])


@pytest.mark.parametrize("name, content, fragment", [
    ("bad.png", b"\x89PNG not really", "entry 0 \\('bad.png'\\) is not a readable PNG or JPEG image"),
    ("bad.jpg", b"\xff\xd8 broken", "entry 0 \\('bad.jpg'\\) is not a readable PNG or JPEG image"),
    ("bad.wav", b"RIFF....WAVEjunk", "entry 0 \\('bad.wav'\\) is not a readable PCM .wav file"),
    ("bad.txt", b"1 2 3", "entry 0 \\('bad.txt'\\) has file type '.txt', which kdtrack cannot read"),
])
def test_unreadable_files_have_their_own_error(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    (tmp_path / name).write_bytes(content)
    (tmp_path / "m.json").write_text(json.dumps([{"file": name, "label": 0, "split": "train"}]))
    with pytest.raises(DataError, match=fragment):
        load_manifest(tmp_path / "m.json")


# ---------------------------------------------------------------- data.input_shape


def test_input_shape_reshapes_manifest_samples_or_is_refused(tmp_path: Path) -> None:
    arrays = [np.arange(40, dtype=np.float32) + i for i in range(4)]
    path = write_arrays(tmp_path, arrays)
    cfg = DataConfig(source="manifest", manifest=str(path))
    assert cfg.input_shape == () and build_dataset(cfg).input_shape == (40,)
    shaped = build_dataset(DataConfig(source="manifest", manifest=str(path), input_shape=(1, 40)))
    assert shaped.input_shape == (1, 40) and shaped.batch([2])[0].shape == (1, 1, 40)
    np.testing.assert_array_equal(shaped.arrays([2])[0], arrays[2].reshape(1, 40))
    assert dataset_digest(shaped) == plain_digest(shaped.sample_ids, [0, 1, 0, 1], ["train"] * 4, arrays, (1, 40))
    assert dataset_digest(shaped) != dataset_digest(build_dataset(cfg))  # a reshape is a different dataset
    with pytest.raises(DataError, match="data.input_shape \\[3, 13\\] holds 39 values but the samples have shape "
                                        "\\[40\\] \\(40 values\\)"):
        build_dataset(DataConfig(source="manifest", manifest=str(path), input_shape=(3, 13)))
    digits = build_dataset(DataConfig(source="digits", input_shape=(64,)))
    assert digits.input_shape == (64,) and digits.features.shape == (1797, 64)
    with pytest.raises(DataError, match="holds 60 values"):
        build_dataset(DataConfig(source="digits", input_shape=(60,)))
    assert DataConfig(source="synthetic").input_shape == (1, 8, 8)  # synthetic's default shape is unchanged


# ---------------------------------------------------------------- the model is checked before the data is read


def test_a_model_that_cannot_take_the_data_fails_after_one_file(tmp_path: Path, reads: list[str]) -> None:
    from kdtrack import config
    from kdtrack.errors import KdtrackError
    from kdtrack.stages import train_teacher

    path = write_arrays(tmp_path, [np.zeros((1, 2, 2, 2), dtype=np.float32)] * 6)
    cfg = config.load(None, ["data.source=manifest", f"data.manifest={path}", "model.name=cnn", "device=cpu"])
    with pytest.raises(KdtrackError, match="\\(1, 2, 2, 2\\)"):
        train_teacher.run(cfg)
    assert reads == ["0.npy"]


# ---------------------------------------------------------------- memory


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from kdtrack.data import dataset_digest, fit_normalisation, load_manifest, make_loader

    def peak_kib():
        # this process's own peak resident memory: VmHWM starts anew at exec, whereas ru_maxrss keeps the peak of
        # the parent it was started from (a test session of several hundred MiB would hide the growth measured here)
        with open("/proc/self/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

    path, lazy = Path(sys.argv[1]), sys.argv[2] == "lazy"
    base = peak_kib()
    ds = load_manifest(path, lazy=lazy)
    digest = dataset_digest(ds)
    train = ds.select(["train"])
    train = train.with_normalisation(fit_normalisation(train))
    rows = sum(len(b[0]) for b in make_loader(train, 256, shuffle=True, seed=0))
    print(json.dumps({"kib": peak_kib() - base, "rows": rows}))
""")


def _peak_kib(path: Path, mode: str) -> tuple[int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), mode], capture_output=True, text=True,
                         env=env, check=True, cwd=Path(__file__).resolve().parents[1])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["kib"], result["rows"]


@pytest.mark.slow  # writes 22,000 files and starts three Python processes (~20 s)
def test_peak_memory_of_index_and_epoch_is_flat_from_2000_to_20000_files(tmp_path: Path) -> None:
    sample = np.ones((2, 32, 32), dtype=np.float32)  # 8 KiB per sample: eager growth 18,000 x 8 KiB = 141 MiB
    paths = {}
    for n in (2000, 20000):
        folder = tmp_path / str(n)
        (folder / "s").mkdir(parents=True)
        for i in range(n):
            np.save(folder / "s" / f"{i}.npy", sample * (i % 7))
        samples: list[dict[str, Any]] = [{"file": f"s/{i}.npy", "label": i % 2, "split": "train"} for i in range(n)]
        paths[n] = folder / "manifest.json"
        paths[n].write_text(json.dumps({"num_classes": 2, "samples": samples}))
    small, rows_small = _peak_kib(paths[2000], "lazy")
    large, rows_large = _peak_kib(paths[20000], "lazy")
    eager, _ = _peak_kib(paths[20000], "eager")
    assert (rows_small, rows_large) == (2000, 20000)
    data_kib = 20000 * sample.nbytes // 1024  # 156 MiB
    # the measure sees the data when a dataset holds it (the peak counts growth above the peak of the imports, so
    # not all of it: 137 of 156 MiB in one run)
    assert eager - large > data_kib * 0.5, (large, eager)
    # generous bounds: a quarter of what eager loading grows by, and 4 KiB of index per file (measured: ~1.7 KiB)
    assert large - small < (eager - small) / 4 and (large - small) / 18000 < 4, (small, large, eager)


# ---------------------------------------------------------------- the benchmark case


@pytest.mark.slow  # writes files and starts two DataLoader workers (~3 s)
def test_data_loading_benchmark_reports_rows_per_second(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))  # benchmarks/ is a folder of the repository, not part of the package
    from benchmarks import data_loading
    from benchmarks.settings import make_settings

    settings = make_settings("quick", device="cpu", threads=1, workdir=tmp_path, repeats=2, data_files=60,
                             input_shape=(1, 4, 4), train_batch=16)
    r = data_loading.run(settings)
    assert set(r.raw) == {"startup_eager", "startup_lazy", "epoch_eager", "epoch_lazy_0", "epoch_lazy_2",
                          "cache_eager", "cache_lazy_0", "cache_lazy_2"}
    assert all(len(v) == 2 and min(v) > 0 for v in r.raw.values())
    by_name = {f.name: f for f in r.figures}
    median = {k: float(np.median(v)) for k, v in r.raw.items()}
    assert by_name["rows/s, lazy with 2 workers"].value == pytest.approx(60 / median["epoch_lazy_2"], rel=1e-12)
    assert by_name["rows/s, eager"].value == pytest.approx(60 / median["epoch_eager"], rel=1e-12)
    assert by_name["cache build rows/s, lazy with 2 workers"].value == pytest.approx(60 / median["cache_lazy_2"],
                                                                                    rel=1e-12)
    assert by_name["lazy / eager start-up (warm sidecar)"].value == pytest.approx(
        median["startup_lazy"] / median["startup_eager"], rel=1e-12)
    assert r.params["files"] == 60 and not (tmp_path / "data_loading").exists()
