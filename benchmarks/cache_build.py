"""Cache build throughput: rows/s of `cache.build` against the bare teacher forward over the same batches."""
from __future__ import annotations

import torch

from benchmarks import fixtures
from benchmarks.measure import interleaved
from benchmarks.report import Figure, Result, Target
from benchmarks.settings import Settings
from kdtrack import cache
from kdtrack.data import dataset_digest, make_loader

NAME = "cache_build"
TARGET = Target(">=", 0.9)


def run(settings: Settings) -> Result:
    """Rows/s of a whole build call (store creation, forward, writes, done flags) vs forward alone, interleaved."""
    device, amp = settings.torch_device, settings.amp_dtype
    ds = fixtures.dataset(settings.build_rows, settings.input_shape, settings.num_classes)
    teacher = fixtures.model(settings.teacher, ds, device, seed=1).eval()
    digest = dataset_digest(ds)
    path = settings.workdir / "cache_build.zarr"
    chunk_rows = cache.default_chunk_rows((ds.num_classes,), "float16")
    # Batches of the build start at each chunk's first row; with shuffle off the loader's batches are the same rows.
    loader = make_loader(ds, settings.build_batch, shuffle=False, seed=0, device=device)

    def build(_round: int) -> None:
        fixtures.build_cache(path, settings.teacher, teacher, ds, device, batch_size=settings.build_batch,
                             amp_dtype=amp, digest=digest)

    def forward(_round: int) -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for batch in loader:
                teacher(batch[0].to(device, non_blocking=True))  # (B, C), left on the device

    seconds = interleaved({"build": build, "forward": forward}, settings.repeats, device=device)
    raw = {name: [len(ds) / s for s in values] for name, values in seconds.items()}
    figures = [Figure.ratio("build / bare forward rows/s", raw, "build", "forward", TARGET)]
    params = {"teacher": settings.teacher, "rows": len(ds), "batch_size": settings.build_batch, "dtype": "float16",
              "chunk_rows": chunk_rows, "num_classes": ds.num_classes, "input_shape": list(ds.input_shape),
              "amp": str(amp), "store_bytes": cache.store_nbytes(path)}
    notes = [f"{settings.teacher} over {len(ds)} rows, batch {settings.build_batch}; build time is the whole "
             "cache.build call: probe, store creation, ids and labels, forward, float16 writes, done flags"]
    return Result(NAME, "Cache build throughput", params, raw, {k: "rows/s" for k in raw}, figures, notes)
