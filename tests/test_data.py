"""Data sources, IndexedDataset, digest, index splits and loaders; every fixture is written under tmp_path."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from kdtrack.config import DataConfig
from kdtrack.data import (
    EpochShuffleSampler,
    IndexedDataset,
    Normalisation,
    build_dataset,
    dataset_digest,
    fit_normalisation,
    load_manifest,
    make_loader,
)
from kdtrack.data.sources import stratified_splits
from kdtrack.errors import DataError

# ---------------------------------------------------------------- helpers


def reference_digest(ds: IndexedDataset) -> str:
    """The digest written out the slow, obvious way, pinning the format of dataset_digest."""
    outer = hashlib.sha256(f"kdtrack.dataset-digest/1\0{ds.input_shape}\0{len(ds)}\n".encode())
    for i in range(len(ds)):
        outer.update(f"{ds.sample_ids[i]}\0{int(ds.labels[i])}\0{ds.splits[i]}\0".encode())
        outer.update(hashlib.sha256(ds.features[i].astype("<f4").tobytes()).digest())
    return outer.hexdigest()


def small_dataset(n: int = 10, domains: list[str] | None = None) -> IndexedDataset:
    rng = np.random.default_rng(0)
    return IndexedDataset(
        features=rng.normal(3.0, 2.0, size=(n, 2, 3)).astype(np.float32),
        labels=np.arange(n) % 3,
        sample_ids=[f"s/{i}" for i in range(n)],
        splits=np.array(["train", "val"] * (n // 2)),
        domains=np.array(domains if domains else ["default"] * n),
        num_classes=3,
        source="test",
    )


SAMPLE_ARRAYS = {
    "a/0.npy": np.arange(6, dtype=np.float32).reshape(2, 3),
    "a/1.npy": np.full((2, 3), 7.0),  # float64 on disk: must load as float32
    "b/2.npy": -np.ones((2, 3), dtype=np.int16),
    "b/3.npy": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
}


def write_manifest(folder: Path, mutate: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """Four samples under `folder` and folder/manifest.json; `mutate(doc, folder)` edits them first."""
    for name, arr in SAMPLE_ARRAYS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / name, arr)
    doc: dict[str, Any] = {
        "classes": ["cat", "dog", "emu"],
        "splits": ["calib"],
        "samples": [
            {"file": "a/0.npy", "label": "dog", "split": "train", "domain": "studio", "city": "Oslo"},
            {"file": "./a//1.npy", "label": 2, "split": "train", "device": "phone"},
            {"file": "b/2.npy", "label": 0, "split": "calib"},
            {"file": "b/3.npy", "label": None, "split": "unlabeled", "device": "phone"},
        ],
    }
    if mutate:
        mutate(doc, folder)
    path = folder / "manifest.json"
    path.write_text(json.dumps(doc))
    return path


def manifest_cfg(path: Path, **kw: Any) -> DataConfig:
    return DataConfig(source="manifest", manifest=str(path), **kw)


@pytest.fixture(scope="session")  # built once, whatever order the tests run in
def digits() -> IndexedDataset:
    return build_dataset(DataConfig(source="digits", seed=0))


# ---------------------------------------------------------------- built-in sources


def test_digits_shapes_splits_and_ids(digits: IndexedDataset) -> None:
    assert digits.features.shape == (1797, 1, 8, 8) and digits.features.dtype == np.float32
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and digits.source == "digits"
    assert digits.features.min() == 0 and digits.features.max() == 16
    assert digits.sample_ids[:2] == ["digits/0", "digits/1"] and digits.domain_names == ["default"]
    counts = digits.split_counts()
    assert sum(counts.values()) == 1797 and set(counts) == {"train", "val", "test"}
    assert abs(counts["val"] - 0.15 * 1797) < 10 and abs(counts["test"] - 0.15 * 1797) < 10
    for split in ("train", "val", "test"):  # stratified: every class in every split
        assert set(digits.labels[digits.splits == split].tolist()) == set(range(10))


def test_digits_is_stable_and_seed_moves_splits(digits: IndexedDataset) -> None:
    again = build_dataset(DataConfig(source="digits", seed=0))
    assert again.sample_ids == digits.sample_ids and dataset_digest(again) == dataset_digest(digits)
    other = build_dataset(DataConfig(source="digits", seed=1))
    assert (other.splits != digits.splits).any() and dataset_digest(other) != dataset_digest(digits)


def test_digits_are_parsed_once_and_each_dataset_owns_its_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets

    from kdtrack.data import sources

    real, calls = sklearn.datasets.load_digits, []
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: calls.append(1) or real())
    sources._digits.cache_clear()
    try:
        first, second = (build_dataset(DataConfig(source="digits")) for _ in range(2))
    finally:
        sources._digits.cache_clear()  # later tests parse the real function again
    assert calls == [1]
    np.testing.assert_array_equal(first.features.reshape(-1, 64), real().data.astype(np.float32))
    first.features[0] += 1  # one dataset's arrays are its own
    assert second.features[0].sum() == real().data[0].sum()
    first.labels[0] = 9 - first.labels[0]
    assert second.labels[0] == real().target[0]


def test_stratified_split_counts_and_bad_fractions() -> None:
    labels = np.repeat([0, 1], [100, 40])
    splits = stratified_splits(labels, 0.2, 0.1, seed=3)
    assert ((labels == 0) & (splits == "val")).sum() == 20 and ((labels == 1) & (splits == "test")).sum() == 4
    with pytest.raises(DataError, match="leave no training data"):
        stratified_splits(labels, 0.6, 0.5, seed=0)


def test_synthetic_counts_unlabelled_and_stability() -> None:
    cfg = DataConfig(source="synthetic", num_samples=300, num_classes=4, input_shape=(3, 2, 2), unlabeled_samples=50)
    ds = build_dataset(cfg)
    assert ds.features.shape == (350, 3, 2, 2) and ds.num_classes == 4
    assert ds.split_counts()["unlabeled"] == 50 and sum(ds.split_counts().values()) == 350
    assert ((ds.labels == -1) == (ds.splits == "unlabeled")).all()
    assert set(ds.labels[:300].tolist()) == {0, 1, 2, 3} and ds.sample_ids[349] == "synthetic/349"
    assert dataset_digest(build_dataset(cfg)) == dataset_digest(ds)
    fewer = build_dataset(DataConfig(**{**cfg.__dict__, "unlabeled_samples": 0}))
    np.testing.assert_array_equal(fewer.features, ds.features[:300])  # labelled rows do not move
    assert dataset_digest(build_dataset(DataConfig(**{**cfg.__dict__, "seed": 1}))) != dataset_digest(ds)


def test_synthetic_is_learnable_but_not_trivial() -> None:
    ds = build_dataset(DataConfig(source="synthetic", num_samples=2000, num_classes=10, input_shape=(1, 8, 8)))
    train, val = ds.select(["train"]), ds.select(["val"])
    xt, xv = train.features.reshape(len(train), -1), val.features.reshape(len(val), -1)
    means = np.stack([xt[train.labels == k].mean(0) for k in range(10)])
    pred = ((xv[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == val.labels).mean()
    assert 0.4 < accuracy < 0.95, accuracy  # chance is 0.1


@pytest.mark.parametrize("override, fragment", [
    ({"num_classes": 1}, "at least 2 classes"),
    ({"input_shape": (0, 4)}, "no or empty dimensions"),
    ({"num_samples": 0}, "num_samples >= 1"),
])
def test_synthetic_bad_config(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(DataError, match=fragment):
        build_dataset(DataConfig(source="synthetic", **override))


def test_unknown_source_lists_valid_ones() -> None:
    with pytest.raises(DataError, match="unknown data source 'mnist'.*digits, synthetic, manifest"):
        build_dataset(DataConfig(source="mnist"))


# ---------------------------------------------------------------- manifest


def test_manifest_builds_with_classes_domains_and_attributes(tmp_path: Path) -> None:
    ds = build_dataset(manifest_cfg(write_manifest(tmp_path)))
    assert ds.sample_ids == ["a/0.npy", "a/1.npy", "b/2.npy", "b/3.npy"]
    assert ds.labels.tolist() == [1, 2, 0, -1] and ds.num_classes == 3 and ds.source == "manifest"
    assert ds.splits.tolist() == ["train", "train", "calib", "unlabeled"]
    assert ds.domains.tolist() == ["studio", "phone", "default", "phone"]
    assert ds.domain_names == ["default", "phone", "studio"]
    assert ds.attributes["device"].tolist() == ["", "phone", "", "phone"] and ds.attributes["city"][0] == "Oslo"
    assert ds.features.dtype == np.float32 and ds.features.flags.c_contiguous
    for row, arr in enumerate(SAMPLE_ARRAYS.values()):
        np.testing.assert_array_equal(ds.features[row], arr.astype(np.float32))


def test_manifest_plain_list_uses_config_num_classes(tmp_path: Path) -> None:
    path = write_manifest(tmp_path)
    path.write_text(json.dumps([{"file": "a/0.npy", "label": 4, "split": "test"}]))
    ds = build_dataset(manifest_cfg(path, num_classes=5))
    assert ds.num_classes == 5 and ds.labels.tolist() == [4]
    with pytest.raises(DataError, match="out of range 0..3"):
        build_dataset(manifest_cfg(path, num_classes=4))


def test_manifest_ids_and_digest_do_not_depend_on_root_location(tmp_path: Path) -> None:
    first = build_dataset(manifest_cfg(write_manifest(tmp_path / "one")))
    shutil.copytree(tmp_path / "one", tmp_path / "elsewhere" / "two")
    moved = build_dataset(manifest_cfg(tmp_path / "elsewhere" / "two" / "manifest.json"))
    assert moved.sample_ids == first.sample_ids and dataset_digest(moved) == dataset_digest(first)
    # manifest kept apart from its data, found through data.root
    shutil.move(tmp_path / "elsewhere" / "two" / "manifest.json", tmp_path / "m.json")
    apart = build_dataset(manifest_cfg(tmp_path / "m.json", root=str(tmp_path / "elsewhere" / "two")))
    assert dataset_digest(apart) == dataset_digest(first)


def _set(index: int, key: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def mutate(doc: dict[str, Any], root: Path) -> None:
        doc["samples"][index][key] = value
    return mutate


def _symlink_out(doc: dict[str, Any], root: Path) -> None:
    outside = root.parent / "outside.npy"
    np.save(outside, np.zeros((2, 3), dtype=np.float32))
    os.symlink(outside, root / "a" / "link.npy")
    doc["samples"][1]["file"] = "a/link.npy"


def _missing_two(doc: dict[str, Any], root: Path) -> None:
    (root / "a" / "1.npy").unlink()
    (root / "b" / "3.npy").unlink()


def _save(name: str, arr: np.ndarray) -> Callable[[dict[str, Any], Path], None]:
    def mutate(doc: dict[str, Any], root: Path) -> None:
        np.save(root / name, arr)
    return mutate


def _drop(key: str, index: int | None = None) -> Callable[[dict[str, Any], Path], None]:
    def mutate(doc: dict[str, Any], root: Path) -> None:
        del (doc if index is None else doc["samples"][index])[key]
    return mutate


MANIFEST_ERRORS = [
    (_set(1, "file", "/etc/passwd"), "entry 1 \\('/etc/passwd'\\) has an absolute file path"),
    (_set(2, "file", "../one/b/2.npy"), "entry 2 \\('../one/b/2.npy'\\) points outside the data root"),
    (_set(2, "file", "b/../../x.npy"), "entry 2 .* points outside the data root"),
    (_symlink_out, "entry 1 \\('a/link.npy'\\) points outside the data root"),
    (_missing_two, "2 of 4 feature files are missing .*entry 1 \\('a/1.npy'\\), manifest entry 3"),
    (_set(0, "split", "trian"), "entry 0 \\('a/0.npy'\\) has unknown split 'trian'.*unlabeled, calib"),
    (_set(2, "label", 3), "entry 2 \\('b/2.npy'\\) has label 3 out of range 0..2"),
    (_set(2, "label", -1), "entry 2 .* has label -1 out of range"),
    (_set(2, "label", 1.5), "entry 2 .* has label 1.5, which is not an integer"),
    (_set(2, "label", True), "entry 2 .* has label True, which is not an integer"),
    (_set(0, "label", "wolf"), "entry 0 \\('a/0.npy'\\) has unknown class name 'wolf'.*cat, dog, emu"),
    (_set(2, "label", None), "entry 2 \\('b/2.npy'\\) has label null in split 'calib'"),
    (_drop("label", 0), "entry 0 \\('a/0.npy'\\) is missing key \"label\""),
    (_drop("split", 1), "entry 1 .* is missing key \"split\""),
    (_drop("samples"), "is missing key \"samples\""),
    (_set(0, "lable", 1), "entry 0 .* has unknown key 'lable'"),
    (_save("b/2.npy", np.zeros((3, 2))), "entry 2 \\('b/2.npy'\\) has feature shape \\(3, 2\\) but manifest entry 0"),
    (_save("a/1.npy", np.array([[0, np.nan, 0], [0, 0, 0]])), "entry 1 \\('a/1.npy'\\) contains NaN or Inf"),
    (_save("a/1.npy", np.array([[0, np.inf, 0], [0, 0, 0]])), "entry 1 .* contains NaN or Inf"),
    (_save("a/1.npy", np.array(["x"] * 6).reshape(2, 3)), "entry 1 .* holds a <U1 array"),
    (_set(3, "file", "a/0.npy"), "duplicate file entry: manifest entry 0 \\('a/0.npy'\\) and manifest entry 3"),
    (_set(3, "file", "./a/0.npy"), "duplicate file entry"),
    (_save("a/1.npy", np.array([{"k": 1}] * 6, dtype=object).reshape(2, 3)), "entry 1 .* is not a readable .npy"),
]


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
@pytest.mark.parametrize("mutate, fragment", MANIFEST_ERRORS)
def test_manifest_errors_name_the_problem(tmp_path: Path, mutate: Callable, fragment: str, lazy: bool) -> None:
    path = write_manifest(tmp_path / "one", mutate)
    with pytest.raises(DataError, match=fragment):
        # lazily, a file other than the first is checked when the digest (every stage's first act) hashes it
        dataset_digest(load_manifest(path, lazy=lazy))


def test_manifest_label_names_need_classes_and_bad_json(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, _drop("classes"))
    with pytest.raises(DataError, match="class name 'dog' as label but the manifest lists no classes"):
        build_dataset(manifest_cfg(path))
    path.write_text('{"samples": [')
    with pytest.raises(DataError, match="is not valid JSON \\(line 1"):
        build_dataset(manifest_cfg(path))
    with pytest.raises(DataError, match="data.manifest is empty"):
        build_dataset(DataConfig(source="manifest"))


def test_manifest_unreadable_npy(tmp_path: Path) -> None:
    path = write_manifest(tmp_path)
    (tmp_path / "b" / "2.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="entry 2 .* is not a readable .npy array"):
        dataset_digest(build_dataset(manifest_cfg(path)))
    (tmp_path / "a" / "0.npy").write_bytes(b"not numpy")  # the first file is read at once, for the shape
    with pytest.raises(DataError, match="entry 0 .* is not a readable .npy array"):
        build_dataset(manifest_cfg(path))


# ---------------------------------------------------------------- digest


def test_digest_matches_reference_and_reacts_to_every_change() -> None:
    ds = small_dataset()
    base = dataset_digest(ds)
    assert base == reference_digest(ds) and len(base) == 64
    assert dataset_digest(small_dataset()) == base  # rebuilt: unchanged

    labels = ds.labels.copy()
    labels[4] = (labels[4] + 1) % 3
    features = ds.features.copy()
    features[7, 1, 2] += 1e-3
    splits = ds.splits.copy()
    splits[0] = "test"
    changed = {
        "label": IndexedDataset(ds.features, labels, ds.sample_ids, ds.splits, ds.domains, 3, "test"),
        "feature": IndexedDataset(features, ds.labels, ds.sample_ids, ds.splits, ds.domains, 3, "test"),
        "split": ds.with_splits(splits),
        "order": ds.take(np.arange(len(ds))[::-1]),
        "reshape": IndexedDataset(ds.features.reshape(10, 6), ds.labels, ds.sample_ids, ds.splits, ds.domains, 3, "t"),
    }
    digests = {name: dataset_digest(d) for name, d in changed.items()}
    assert base not in digests.values() and len(set(digests.values())) == len(digests)
    # normalisation, domains and the source name are not part of the sample content
    same = IndexedDataset(ds.features.copy(), ds.labels, list(ds.sample_ids), ds.splits, ["x"] * 10, 3, "renamed")
    assert dataset_digest(same.with_normalisation(Normalisation(1.0, 2.0))) == base


# ---------------------------------------------------------------- index splits


def write_indices(folder: Path, **lists: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in lists.items():
        (folder / f"{split}_indices.json").write_text(json.dumps(rows))
    return folder


def test_index_splits_reassign_rows(tmp_path: Path, digits: IndexedDataset) -> None:
    folder = write_indices(tmp_path / "idx", train=[5, 1, 3], tunev=[0, 1796])
    ds = build_dataset(DataConfig(source="digits", index_splits=str(folder)))
    assert ds.sample_ids == ["digits/0", "digits/1", "digits/3", "digits/5", "digits/1796"]
    assert ds.splits.tolist() == ["tunev", "train", "train", "train", "tunev"]
    rows = [0, 1, 3, 5, 1796]
    np.testing.assert_array_equal(ds.features, digits.features[rows])
    np.testing.assert_array_equal(ds.labels, digits.labels[rows])
    assert ds.split_counts() == {"train": 3, "tunev": 2} and ds[4][2] == 4  # rows renumbered


@pytest.mark.parametrize("lists, fragment", [
    ({"train": [0, 10]}, "index 10 out of range for a dataset of 10 rows"),
    ({"train": [-1]}, "index -1 out of range"),
    ({"train": [0, 2], "val": [2, 3]}, "row 2 \\(s/2\\) is in two index-split files: train_indices.json and val"),
    ({"train": [1, 1]}, "lists row 1 more than once"),
    ({"train": [0, "1"]}, "non-integer entry '1'"),
    ({"train": [0, 1.0]}, "non-integer entry 1.0"),
    ({"train": [None]}, "non-integer entry None"),
    ({"train": [True]}, "non-integer entry True"),
    ({"train": {"rows": [1]}}, "holds a dict"),
])
def test_index_split_errors(tmp_path: Path, lists: dict[str, Any], fragment: str) -> None:
    from kdtrack.data import apply_index_splits

    with pytest.raises(DataError, match=fragment):
        apply_index_splits(small_dataset(), write_indices(tmp_path / "idx", **lists))


def test_index_split_folder_errors(tmp_path: Path) -> None:
    from kdtrack.data import apply_index_splits

    with pytest.raises(DataError, match="index-split folder .* not found"):
        apply_index_splits(small_dataset(), tmp_path / "nope")
    (tmp_path / "train.json").write_text("[0]")
    with pytest.raises(DataError, match="has no \\*_indices.json files"):
        apply_index_splits(small_dataset(), tmp_path)


# ---------------------------------------------------------------- IndexedDataset


def test_getitem_applies_normalisation_and_domain_index() -> None:
    ds = small_dataset(domains=["b", "a"] * 5)
    assert ds.domain_names == ["a", "b"]
    x, y, row, domain = ds[3]
    assert torch.equal(x, torch.from_numpy(ds.features[3])) and x.dtype == torch.float32
    assert (y, row, domain) == (0, 3, 0) and all(type(v) is int for v in (y, row, domain))
    normed = ds.with_normalisation(Normalisation(mean=3.0, std=2.0))
    assert normed.features is ds.features and ds.normalisation is None
    torch.testing.assert_close(normed[3][0], torch.from_numpy((ds.features[3] - 3.0) / 2.0))
    assert ds[3][0].sum() == float(ds.features[3].sum())  # the raw dataset still returns raw values


def test_select_keeps_order_renumbers_and_names_missing_split() -> None:
    ds = small_dataset()
    val = ds.select(["val"])
    assert val.sample_ids == ["s/1", "s/3", "s/5", "s/7", "s/9"] and val[0][2] == 0
    np.testing.assert_array_equal(val.features, ds.features[1::2])
    assert ds.select("val").sample_ids == val.sample_ids and len(ds.select(["train", "val"])) == 10
    with pytest.raises(DataError, match="split 'test' is not in this test dataset.*train, val"):
        ds.select(["val", "test"])


def test_dataset_refuses_inconsistent_inputs() -> None:
    ds = small_dataset(4)
    with pytest.raises(DataError, match="appears more than once"):
        IndexedDataset(ds.features, ds.labels, ["a", "b", "a", "c"], ds.splits, ds.domains, 3, "t")
    with pytest.raises(DataError, match="lengths"):
        IndexedDataset(ds.features, ds.labels[:3], ds.sample_ids, ds.splits, ds.domains, 3, "t")
    with pytest.raises(DataError, match="has label 3, outside 0..2"):
        IndexedDataset(ds.features, np.array([0, 1, 2, 3]), ds.sample_ids, ds.splits, ds.domains, 3, "t")


def test_pickled_dataset_round_trips() -> None:
    ds = small_dataset().with_normalisation(Normalisation(1.0, 3.0))
    back = pickle.loads(pickle.dumps(ds))
    for a, b in zip(ds[5], back[5]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_fit_normalisation_and_dict_round_trip() -> None:
    ds = small_dataset()
    norm = fit_normalisation(ds)
    assert norm.mean == pytest.approx(ds.features.astype(np.float64).mean(), rel=1e-12)
    assert norm.std == pytest.approx(ds.features.astype(np.float64).std(), rel=1e-12)
    d = norm.to_dict()
    assert type(d["mean"]) is float and Normalisation.from_dict(d) == norm
    constant = IndexedDataset(np.full((4, 2), 5.0), np.zeros(4), list("abcd"), ["train"] * 4, ["d"] * 4, 2, "c")
    assert fit_normalisation(constant) == Normalisation(5.0, 1.0)
    with pytest.raises(DataError, match="not of the form"):
        Normalisation.from_dict({"mean": 1.0})
    with pytest.raises(DataError, match="positive std"):
        Normalisation.from_dict({"mean": 1.0, "std": 0.0})


# ---------------------------------------------------------------- loaders


def test_epoch_sampler_reproduces_each_epoch() -> None:
    s = EpochShuffleSampler(50, seed=7)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert all(sorted(o) == list(range(50)) for o in orders) and len(s) == 50
    assert orders[0] != orders[1] != orders[2]
    resumed = EpochShuffleSampler(50, seed=7)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2] and list(resumed) == orders[2]
    other = EpochShuffleSampler(50, seed=8)
    assert list(other) != orders[0]
    swapped = EpochShuffleSampler(50, seed=1)  # (seed 1, epoch 0) must not replay (seed 0, epoch 1)
    zero = EpochShuffleSampler(50, seed=0)
    zero.set_epoch(1)
    assert list(swapped) != list(zero)


def test_make_loader_batches_equal_collated_items() -> None:
    ds = small_dataset(domains=["b", "a"] * 5).with_normalisation(Normalisation(3.0, 2.0))
    loader = make_loader(ds, 4, shuffle=True, seed=1)
    loader.sampler.set_epoch(2)
    order = loader.sampler.permutation().tolist()
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2] and not loader.pin_memory
    x, y, row, domain = batches[0]
    assert x.shape == (4, 2, 3) and x.dtype == torch.float32 and y.dtype == row.dtype == domain.dtype == torch.int64
    expected = default_collate([ds[i] for i in order[:4]])
    for got, want in zip(batches[0], expected):
        assert torch.equal(got, want)
    assert torch.cat([b[2] for b in batches]).tolist() == order
    assert loader.dataset.sample_ids == ds.sample_ids and len(loader.dataset) == 10


def test_make_loader_sequential_drop_last_and_workers() -> None:
    ds = small_dataset()
    rows = [b[2].tolist() for b in make_loader(ds, 4, shuffle=False, seed=0, drop_last=True)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loader = make_loader(ds, 3, shuffle=True, seed=0, num_workers=2)
    assert loader.persistent_workers
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        got = torch.cat([b[2] for b in loader]).tolist()
        assert got == loader.sampler.permutation().tolist()
    with pytest.raises(DataError, match="positive batch size"):
        make_loader(ds, 0, shuffle=False, seed=0)


# ---------------------------------------------------------------- the student view and the rows a teacher may label

#            0        1        2      3       4        5        6      7       8            9       10       11
SPLITS = ["train", "train", "val", "test", "train", "train", "val", "test", "unlabeled", "train", "train", "train"]
LABELS = [0, 1, 0, 1, 0, 2, 1, 0, -1, 0, 0, 2]


def _hand_dataset(splits: list[str] = SPLITS, labels: list[int] = LABELS) -> IndexedDataset:
    n = len(splits)
    return IndexedDataset(features=np.arange(n * 2, dtype=np.float32).reshape(n, 2), labels=np.array(labels),
                          sample_ids=[f"s{i}" for i in range(n)], splits=np.array(splits),
                          domains=np.array(["a", "b", "c"] * n)[:n], num_classes=3, source="hand",
                          attributes={"site": np.arange(n) * 10}, normalisation=Normalisation(0.5, 2.0))


def _rows_of(ds: IndexedDataset) -> list[int]:
    return [int(i[1:]) for i in ds.sample_ids]


def _same_rows(ds: IndexedDataset, full: IndexedDataset, rows: list[int], splits: list[str]) -> None:
    """`ds` is exactly `rows` of `full`, in that order, with `splits` as split names; everything else is kept."""
    assert ds.sample_ids == [f"s{r}" for r in rows]
    np.testing.assert_array_equal(ds.features, full.features[rows])
    np.testing.assert_array_equal(ds.labels, full.labels[rows])
    np.testing.assert_array_equal(ds.domains, full.domains[rows])
    assert ds.splits.tolist() == splits
    assert list(ds.attributes) == ["site"]
    np.testing.assert_array_equal(ds.attributes["site"], np.array(rows) * 10)
    assert (ds.num_classes, ds.source, ds.normalisation) == (3, "hand", Normalisation(0.5, 2.0))


def _index_file(folder: Path, name: str, rows: list[int]) -> str:
    path = folder / name
    path.write_text(json.dumps(rows))
    return str(path)


def test_distillation_rows_of_named_splits_and_split_files(tmp_path: Path) -> None:
    """Named splits keep row order; an absent default split (`unlabeled` here) is skipped; each file's rows follow
    in ascending row order under the file's split name."""
    from kdtrack.data import distillation_rows

    full = _hand_dataset()
    without_unlabeled = full.take(np.flatnonzero(full.splits != "unlabeled"))
    _same_rows(distillation_rows(full, ("train",)), full, [0, 1, 4, 5, 9, 10, 11], ["train"] * 7)
    ds = distillation_rows(without_unlabeled, ("train", "unlabeled"))
    assert _rows_of(ds) == [0, 1, 4, 5, 9, 10, 11]
    tune = _index_file(tmp_path, "tune_indices.json", [7, 3])  # test rows, under an explicitly allowed name
    ds = distillation_rows(full, ("train", "unlabeled"), allow=("tune",), split_files=[tune])
    _same_rows(ds, full, [0, 1, 4, 5, 8, 9, 10, 11, 3, 7], ["train"] * 4 + ["unlabeled"] + ["train"] * 3 + ["tune"] * 2)
    # held-out splits named and allowed, then a file alone
    ds = distillation_rows(full, ("val", "test"), allow=("val", "test"))
    _same_rows(ds, full, [2, 3, 6, 7], ["val", "test", "val", "test"])
    one = _index_file(tmp_path, "extra_indices.json", [4])
    _same_rows(distillation_rows(full, (), allow=("extra",), split_files=[one]), full, [4], ["extra"])
    two = _index_file(tmp_path, "unlabeled_indices.json", [10, 0])
    _same_rows(distillation_rows(full, (), split_files=[two]), full, [0, 10], ["unlabeled", "unlabeled"])


def test_distillation_rows_refuse_held_out_rows_naming_the_first_sample(tmp_path: Path) -> None:
    """A held-out split, named or behind a file's name, is refused with its first sample in row order; a file named
    after a training split answers for each row's own split even when that name is allowed."""
    from kdtrack.data import distillation_rows
    from kdtrack.errors import LeakageError

    full = _hand_dataset()
    hint = "cache only train and unlabeled rows, or allow it explicitly with --allow-split"
    with pytest.raises(LeakageError, match=rf"^sample s2 is in split 'val', which is held out from distillation — "
                                           rf"{hint} val$"):
        distillation_rows(full, ("train", "val"))
    with pytest.raises(LeakageError, match=rf"^sample s3 is in split 'test', which is held out from distillation — "
                                           rf"{hint} test$"):
        distillation_rows(full, ("train", "val", "test"), allow=("val",))
    train_file = _index_file(tmp_path, "train_indices.json", [0, 7, 3])
    for allow in ((), ("train",)):
        with pytest.raises(LeakageError, match=rf"^sample s3 is in split 'test', which is held out from distillation "
                                               rf"\(listed in {train_file}\) — {hint} test$"):
            distillation_rows(full, ("train",), allow=allow, split_files=[train_file])
    tune = _index_file(tmp_path, "tune_indices.json", [1, 6])
    with pytest.raises(LeakageError, match=rf"^sample s6 is in split 'val', which is held out from distillation "
                                           rf"\(listed in {tune}\)"):
        distillation_rows(full, ("train",), split_files=[tune])


def test_distillation_rows_bad_requests(tmp_path: Path) -> None:
    from kdtrack.data import distillation_rows

    full = _hand_dataset()
    present = "choose from the splits present: test, train, unlabeled, val"
    with pytest.raises(DataError, match=rf"^split 'holdout' is not in this hand dataset — {present}$"):
        distillation_rows(full, ("train", "holdout"))
    no_val = full.take(np.flatnonzero(full.splits != "val"))
    with pytest.raises(DataError, match="^split 'val' is not in this hand dataset — choose from the splits present: "
                                        "test, train, unlabeled$"):
        distillation_rows(no_val, ("val",), allow=("val",))
    only_train = full.select(["train"])
    with pytest.raises(DataError, match=r"^no rows to cache: splits \['unlabeled'\] are empty in this hand dataset — "
                                        "choose from the splits present: train$"):
        distillation_rows(only_train, ("unlabeled",))
    empty = _index_file(tmp_path, "train_indices.json", [])
    with pytest.raises(DataError, match=r"^no rows to cache: splits \[\] are empty"):
        distillation_rows(full, (), split_files=[empty])
    with pytest.raises(DataError, match=r"is not named <split>_indices\.json"):
        distillation_rows(full, ("train",), split_files=[_index_file(tmp_path, "tune.json", [0])])


def _student(monkeypatch: pytest.MonkeyPatch, full: IndexedDataset, fraction: float, seed: int) -> IndexedDataset:
    from kdtrack.data import selection

    asked = DataConfig(student_labels=fraction, seed=seed)
    monkeypatch.setattr(selection, "build_dataset", lambda cfg: full if cfg is asked else pytest.fail(f"built {cfg}"))
    return selection.student_dataset(asked)


@pytest.mark.parametrize("seed", [0, 5])
def test_student_dataset_keeps_a_seeded_fraction_of_each_class(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Per class (in label order) the train rows are permuted by default_rng([seed, 7]); the first
    max(1, round(fraction * n)) keep their label, the rest become split `unlabeled` with label -1."""
    #        train label 0: 8 rows, label 1: 3 rows, label 2: 2 rows (label 2 is in no held-out split)
    splits = ["train"] * 13 + ["val", "val", "test", "unlabeled"]
    labels = [0, 0, 1, 0, 2, 0, 1, 0, 0, 2, 0, 1, 0] + [0, 1, 1, -1]
    full = _hand_dataset(splits, labels)
    rng = np.random.default_rng([seed, 7])
    dropped = []
    for label, keep in ((0, 2), (1, 1), (2, 1)):  # round(0.25 * 8) = 2, round(0.75) = 1, round(0.5) = 0 -> 1
        rows = rng.permutation([i for i in range(13) if labels[i] == label])
        dropped += rows[keep:].tolist()
    assert len(dropped) == 6 + 2 + 1
    ds = _student(monkeypatch, full, 0.25, seed)
    assert ds.splits.tolist() == ["unlabeled" if i in dropped else s for i, s in enumerate(splits)]
    assert ds.labels.tolist() == [-1 if i in dropped else y for i, y in enumerate(labels)]
    assert ds.sample_ids == full.sample_ids
    np.testing.assert_array_equal(ds.features, full.features)
    np.testing.assert_array_equal(ds.domains, full.domains)
    np.testing.assert_array_equal(ds.attributes["site"], full.attributes["site"])
    assert (ds.num_classes, ds.source, list(ds.attributes)) == (3, "hand", ["site"])
    assert full.labels.tolist() == labels and full.splits.tolist() == splits  # the teacher's view is untouched


def test_student_dataset_fraction_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """All labels (1.0) is the teacher's dataset itself; a fraction outside (0, 1] is refused."""
    full = _hand_dataset()
    assert _student(monkeypatch, full, 1.0, 0) is full
    for bad in (0.0, -0.1, 1.5, 2.0):
        with pytest.raises(DataError, match=rf"^data.student_labels={bad} is outside \(0, 1\]"):
            _student(monkeypatch, full, bad, 0)
