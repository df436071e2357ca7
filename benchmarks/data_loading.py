"""Data loading from a manifest of one `.npy` file per sample: start-up and epoch rows/s, eager against lazy."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.measure import interleaved
from benchmarks.report import Figure, Result
from benchmarks.settings import Settings
from kdtrack import cache
from kdtrack.data import IndexedDataset, dataset_digest, fit_normalisation, load_manifest, make_loader

NAME = "data_loading"
_FILES_PER_FOLDER = 1000
_WORKERS = 2
_CACHE_BATCH = 256


def write_manifest(root: Path, files: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    """`files` random float32 samples of `shape`, 1,000 per folder, and `manifest.json` listing them (10 classes)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(files):
        rel = f"{i // _FILES_PER_FOLDER:04d}/{i}.npy"
        if i % _FILES_PER_FOLDER == 0:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, rng.standard_normal(shape, dtype=np.float32))
        samples.append({"file": rel, "label": i % 10, "split": "train"})
    path = root / "manifest.json"
    path.write_text(json.dumps({"num_classes": 10, "samples": samples}))
    return path


def run(settings: Settings) -> Result:
    """Seconds of a start-up (index, digest, normalisation) and of one shuffled epoch, for each way of loading."""
    files, batch = settings.data_files, settings.train_batch
    root = settings.workdir / "data_loading"
    try:
        start = time.perf_counter()
        path = write_manifest(root, files, settings.input_shape)
        write_seconds = time.perf_counter() - start
        start = time.perf_counter()
        dataset_digest(load_manifest(path))  # the first start hashes every file and writes the sidecar
        first_start = time.perf_counter() - start
        eager, lazy = _ready(load_manifest(path, lazy=False)), _ready(load_manifest(path))
        loaders = {"eager": make_loader(eager, batch, shuffle=True, seed=0),
                   "lazy_0": make_loader(lazy, batch, shuffle=True, seed=0),
                   f"lazy_{_WORKERS}": make_loader(lazy, batch, shuffle=True, seed=0, num_workers=_WORKERS)}

        def epoch(name: str):
            def one(r: int) -> None:
                loaders[name].sampler.set_epoch(r + 1)
                for _ in loaders[name]:
                    pass
            return one

        teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(settings.input_shape), 10))
        attrs = _cache_attrs(eager)
        same_norm = lazy.with_normalisation(eager.normalisation)  # a cache is of one normalisation

        def cache_build(ds: IndexedDataset, workers: int):
            def one(r: int) -> None:
                cache.build(root / "cache.zarr", teacher, ds, attrs=attrs, device=torch.device("cpu"),
                            batch_size=_CACHE_BATCH, resume=False, progress=False, num_workers=workers)
            return one

        variants = {"startup_eager": lambda r: _ready(load_manifest(path, lazy=False)),
                    "startup_lazy": lambda r: _ready(load_manifest(path)),
                    **{f"epoch_{name}": epoch(name) for name in loaders},
                    "cache_eager": cache_build(eager, 0), "cache_lazy_0": cache_build(same_norm, 0),
                    f"cache_lazy_{_WORKERS}": cache_build(same_norm, _WORKERS)}
        raw = interleaved(variants, settings.repeats)  # the warm-up round starts the persistent workers
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows_per_s = {name: files / float(np.median(raw[f"epoch_{name}"])) for name in loaders}
    figures = [Figure(f"rows/s, {name.replace('_', ' with ')} workers" if name != "eager" else "rows/s, eager",
                      rows_per_s[name], "rows/s") for name in loaders]
    figures += [Figure(f"cache build rows/s, {name.replace('_', ' with ')} workers" if name != "eager"
                       else "cache build rows/s, eager", files / float(np.median(raw[f"cache_{name}"])), "rows/s")
                for name in loaders]
    figures += [Figure.ratio("lazy / eager epoch time (0 workers)", raw, "epoch_lazy_0", "epoch_eager"),
                Figure.ratio(f"lazy / eager epoch time ({_WORKERS} workers)", raw, f"epoch_lazy_{_WORKERS}",
                             "epoch_eager"),
                Figure.ratio("lazy / eager start-up (warm sidecar)", raw, "startup_lazy", "startup_eager")]
    params = {"files": files, "input_shape": list(settings.input_shape), "batch_rows": batch,
              "write_seconds": write_seconds, "first_lazy_start_seconds": first_start, "workers": _WORKERS}
    notes = [f"{files:,} .npy files of {list(settings.input_shape)} float32, batches of {batch}, one shuffled epoch "
             "per round; start-up = build the dataset, its digest and the train normalisation; files in the page "
             "cache (written just before), so reads cost system calls and decoding, not disk",
             f"cache build: cache.build of every row with a linear teacher (reading dominates), batches of "
             f"{_CACHE_BATCH}, the lazy rows read in this process or ahead by {_WORKERS} DataLoader workers"]
    return Result(NAME, "Manifest data loading, eager vs lazy", params, raw, {k: "s" for k in raw}, figures, notes)


def _cache_attrs(ds: IndexedDataset) -> dict:
    digest = dataset_digest(ds)
    key = cache.cache_key(checkpoint_sha256="0" * 64, dataset_digest=digest, splits=["train"], dtype="float32",
                          output_shape=(10,), normalisation=ds.normalisation.to_dict())
    return {"teacher_run_id": "none", "checkpoint_sha256": "0" * 64, "dataset_digest": digest, "cache_key": key,
            "splits": ["train"], "normalisation": ds.normalisation.to_dict(), "model_spec": None}


def _ready(ds: IndexedDataset) -> IndexedDataset:
    """What a stage does before training: digest, then the train split normalised."""
    dataset_digest(ds)
    return ds.with_normalisation(fit_normalisation(ds))
