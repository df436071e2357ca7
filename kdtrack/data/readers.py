"""Decode one sample file into a numeric array: `.npy`, `.png`/`.jpg`/`.jpeg` images, PCM `.wav` audio.

Images and audio come out channels first: an image (H, W) gray or (C, H, W) colour as (1 or C, H, W), a wav
(L,) mono or (L, C) as (1 or C, L). Values are the stored ones (0..255 pixels, integer PCM samples): the
normalisation fitted on the training split scales them.
"""
from __future__ import annotations

import io
import math
import posixpath
import warnings
from collections.abc import Callable

import numpy as np

from kdtrack.errors import DataError

_NUMERIC_KINDS = "biuf"  # bool, int, uint, float; complex, object and strings are refused


def _read_npy(path: str, where: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{where} is not a readable .npy array ({exc})",
                        "write it with numpy.save(path, array)") from exc
    known = _known_layout(data)
    if known is not None:
        return known
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle: a manifest must not run code
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where} is not a readable .npy array ({exc})",
                        "write it with numpy.save(path, array)") from exc
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{where} is an .npz archive, not a single .npy array",
                        "save one array per file with numpy.save")
    if len(_LAYOUTS) < _LAYOUTS_KEPT and not arr.dtype.hasobject:
        fortran = arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous
        _LAYOUTS[data[:_header_end(data)]] = (arr.dtype, arr.shape, fortran)
    return arr


# np.load parses each header with ast.literal_eval (~0.1 ms); the files of one dataset share a few headers, so a
# header seen before gives the layout directly and the payload is viewed in place.
_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # header bytes -> (dtype, shape, fortran order)
_LAYOUTS_KEPT = 256


def _header_end(data: bytes) -> int:
    start = 10 if data[6:7] == b"\x01" else 12  # format 1.0: 2-byte header length; 2.0 and 3.0: 4 bytes
    return start + int.from_bytes(data[8:start], "little")


def _known_layout(data: bytes) -> np.ndarray | None:
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        return None
    end = _header_end(data)
    layout = _LAYOUTS.get(data[:end])
    if layout is None:
        return None
    dtype, shape, fortran = layout
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        return None  # truncated or padded: np.load names the problem
    return np.frombuffer(data, dtype, count, offset=end).reshape(shape, order="F" if fortran else "C")


def _read_image(path: str, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only image manifests need it

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where} is not a readable PNG or JPEG image ({exc})",
                        "re-save it as a PNG or JPEG file (e.g. with Pillow's Image.save)") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def _read_wav(path: str, where: str) -> np.ndarray:
    from scipy.io import wavfile  # only audio manifests need it

    try:
        with warnings.catch_warnings():  # unknown chunks (metadata) are skipped; the samples are what matters
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            _, arr = wavfile.read(path)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where} is not a readable PCM .wav file ({exc})",
                        "write it as PCM WAV, e.g. with scipy.io.wavfile.write(path, rate, int16_array)") from exc
    return arr[None] if arr.ndim == 1 else arr.T  # (L, C) -> (C, L)


READERS: dict[str, Callable[[str, str], np.ndarray]] = {
    ".npy": _read_npy, ".png": _read_image, ".jpg": _read_image, ".jpeg": _read_image, ".wav": _read_wav,
}


def check_suffix(name: str, where: str) -> None:
    """Refuse a file type no reader handles, before anything is read."""
    suffix = posixpath.splitext(name)[1]
    if suffix.lower() not in READERS:
        raise DataError(f"{where} has file type {suffix or '(none)'!r}, which kdtrack cannot read",
                        f"store samples as one of: {', '.join(READERS)}")


def read_sample(path: str, where: str) -> np.ndarray:
    """The array in `path` (any numeric dtype, at least one dimension); `where` names it in errors."""
    arr = READERS[posixpath.splitext(path)[1].lower()](path, where)
    if arr.dtype.kind not in _NUMERIC_KINDS or arr.ndim == 0:
        raise DataError(f"{where} holds a {arr.dtype} array of shape {arr.shape}",
                        "save a numeric array with at least one dimension")
    return arr
