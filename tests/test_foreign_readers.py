"""Caches read by tools other than kdtrack: xarray (via Zarr v3 `dimension_names`) and tensorstore (core-spec data
types only, so the sample ids come from `sample_ids_utf8`), on a store as built and as packed for upload."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cache_build_child import NUM_CLASSES, tiny_attrs, tiny_dataset, tiny_model

from kdtrack.cache import build, mark_complete, open_store, pack

N_ROWS, CHUNK_ROWS = 70, 32  # three chunks, the last one short (6 rows)
ID_BYTES = len("tiny/69")  # the longest id, in UTF-8 bytes


@pytest.fixture(scope="module", params=["built", "packed"])
def cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete 70-row store of tiny_model over tiny_dataset, as built in place or packed into shards."""
    ds = tiny_dataset(N_ROWS)
    path = tmp_path_factory.mktemp("foreign") / "logits.zarr"
    build(path, tiny_model(), ds, attrs=tiny_attrs(ds), device=torch.device("cpu"), batch_size=8,
          chunk_rows=CHUNK_ROWS, progress=False)
    mark_complete(open_store(path, "r+"), None)
    if request.param == "built":
        return path
    pack(path, path.with_name("packed.zarr"))
    return path.with_name("packed.zarr")


def expected_logits() -> np.ndarray:
    """The teacher's outputs from one forward of the normalised features, computed without kdtrack.cache."""
    ds = tiny_dataset(N_ROWS)
    with torch.inference_mode():
        return tiny_model()(torch.from_numpy((ds.features - 0.5) / 2.0)).numpy()  # NORM: mean 0.5, std 2


def test_xarray_opens_a_cache_with_named_dimensions(cache: Path) -> None:
    import xarray as xr  # here, not at collection: every pytest-xdist worker collects every module

    ds = tiny_dataset(N_ROWS)
    opened = xr.open_zarr(cache, zarr_format=3, consolidated=False)
    assert dict(opened.sizes) == {"row": N_ROWS, "class": NUM_CLASSES, "byte": ID_BYTES, "chunk": 3}
    assert {name: opened[name].dims for name in opened.data_vars} == {
        "logits": ("row", "class"), "sample_ids": ("row",), "sample_ids_utf8": ("row", "byte"), "labels": ("row",),
        "chunk_done": ("chunk",)}
    assert opened.attrs["format"] == "kdtrack.logits/2" and opened.attrs["complete"] is True
    np.testing.assert_allclose(opened["logits"].values, expected_logits(), rtol=1e-5, atol=1e-5)
    assert opened["sample_ids"].values.tolist() == ds.sample_ids
    assert opened["labels"].dtype == np.int64 and opened["labels"].values.tolist() == ds.labels.tolist()
    assert opened["chunk_done"].values.tolist() == [True, True, True]
    by_id = opened.set_coords("sample_ids").swap_dims(row="sample_ids")  # rows looked up by sample id
    np.testing.assert_allclose(by_id["logits"].sel(sample_ids="tiny/42").values, expected_logits()[42],
                               rtol=1e-5, atol=1e-5)


def ts_read(cache: Path, name: str) -> np.ndarray:
    """One array of the store read by tensorstore's zarr3 driver, which knows only the core data types."""
    import tensorstore as ts  # here, not at collection: every pytest-xdist worker collects every module

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(cache / name)}}
    return ts.open(spec, open=True, read=True).result().read().result()


def test_tensorstore_reads_every_array_and_the_ids_as_utf8_bytes(cache: Path) -> None:
    ds = tiny_dataset(N_ROWS)
    np.testing.assert_allclose(ts_read(cache, "logits"), expected_logits(), rtol=1e-5, atol=1e-5)
    assert ts_read(cache, "labels").tolist() == ds.labels.tolist()
    assert ts_read(cache, "chunk_done").tolist() == [True, True, True]
    raw = ts_read(cache, "sample_ids_utf8")  # (N, longest id) uint8: UTF-8 bytes, then zeros
    assert raw.dtype == np.uint8 and raw.shape == (N_ROWS, ID_BYTES)
    assert [bytes(row).rstrip(b"\0").decode() for row in raw] == ds.sample_ids
    assert raw[5].tolist() == [*b"tiny/5", 0]  # one id spelled out: 6 bytes and one zero
