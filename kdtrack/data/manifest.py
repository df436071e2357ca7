"""Manifest source: a JSON list of samples, each a sample file (`.npy`, `.png`/`.jpg`, `.wav`) under a data root
with a label and split. Read lazily by default: the dataset holds the index and reads files on demand.

Accepted forms: `[entry, ...]` or `{"num_classes": K | "classes": [names], "splits": [extra], "samples": [...]}`.
An entry is `{"file": rel/path.npy, "label": int | class name | null, "split": name,
"domain"?: str, "device"?: str, "city"?: str}`.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdtrack.data.content_hashes import Sidecar
from kdtrack.data.dataset import UNLABELED, IndexedDataset
from kdtrack.data.feature_files import FeatureFile, load_checked, load_feature_files, locate
from kdtrack.data.file_samples import FileSamples, FileTable
from kdtrack.data.readers import check_suffix
from kdtrack.errors import DataError

BASE_SPLITS = ("train", "val", "test", "unlabeled")
ATTRIBUTE_FIELDS = ("device", "city")
_TOP_KEYS = ("num_classes", "classes", "splits", "samples")
_ENTRY_KEYS = ("file", "label", "split", "domain", *ATTRIBUTE_FIELDS)
_TEXT_FIELDS = ("domain", *ATTRIBUTE_FIELDS)


@dataclass(frozen=True)
class _Header:
    num_classes: int
    classes: dict[str, int]  # class name -> label; empty when labels are plain ints
    splits: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    file: FeatureFile
    label: int
    split: str
    text: dict[str, str | None]  # domain, device, city as given (None when absent)


def load_manifest(path: Path, root: Path | None = None, default_num_classes: int = 10, *,
                  lazy: bool = True) -> IndexedDataset:
    """Every sample the manifest at `path` lists; files resolve under `root` (default: the manifest's folder).

    Lazy (default): only the first file is read here (its shape is the dataset's); the rest are read on demand,
    and checked when the digest first hashes them. `lazy=False` reads every file into one array now."""
    doc = _read_json(path)
    header, raw_entries = _parse_top(doc, path, default_num_classes)
    root = path.parent if root is None else root
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder",
                        "set data.root to the folder the manifest's files are under")
    real_root = root.resolve()
    entries = [_parse_entry(i, raw, header, real_root) for i, raw in enumerate(raw_entries)]
    files = [e.file for e in entries]
    stats = locate(files, root, real_root)
    if lazy:
        shape = load_checked(files[0], None, files[0]).shape
        features: np.ndarray | FileSamples = FileSamples(
            FileTable(files, stats, shape, Sidecar(path, real_root)), np.arange(len(files)), shape)
    else:
        features = load_feature_files(files)
    domains = [e.text["domain"] or e.text["device"] or "default" for e in entries]
    attributes = {
        key: np.array([e.text[key] or "" for e in entries])
        for key in ATTRIBUTE_FIELDS
        if any(e.text[key] is not None for e in entries)
    }
    return IndexedDataset(
        features=features,
        labels=np.array([e.label for e in entries], dtype=np.int64),
        sample_ids=[e.file.sample_id for e in entries],
        splits=np.array([e.split for e in entries]),
        domains=np.array(domains),
        num_classes=header.num_classes,
        source="manifest",
        attributes=attributes,
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"manifest {path} not found", "set data.manifest to an existing JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                        "fix the JSON syntax") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path} is not UTF-8 text", "save it as UTF-8 JSON") from exc


def _parse_top(doc: Any, path: Path, default_num_classes: int) -> tuple[_Header, list[Any]]:
    if isinstance(doc, list):
        return _Header(default_num_classes, {}, BASE_SPLITS), doc
    if not isinstance(doc, dict):
        raise DataError(f"manifest {path} holds a {type(doc).__name__}",
                        'write a list of samples or an object with a "samples" list')
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise DataError(f"manifest {path} has unknown key {unknown[0]!r}", f"allowed keys: {', '.join(_TOP_KEYS)}")
    if "samples" not in doc:
        raise DataError(f'manifest {path} is missing key "samples"',
                        'add "samples": [ {"file": ..., "label": ..., "split": ...} ]')
    if not isinstance(doc["samples"], list):
        raise DataError(f'manifest {path}: "samples" must be a list', "write it as [ {...}, {...} ]")
    classes = _parse_classes(doc.get("classes"), path)
    num_classes = _parse_num_classes(doc.get("num_classes"), classes, default_num_classes, path)
    extra = doc.get("splits", [])
    if not isinstance(extra, list) or not all(isinstance(s, str) and s for s in extra):
        raise DataError(f'manifest {path}: "splits" must be a list of non-empty names, got {extra!r}',
                        'e.g. "splits": ["calibration"]')
    splits = tuple(dict.fromkeys([*BASE_SPLITS, *extra]))
    return _Header(num_classes, {name: k for k, name in enumerate(classes)}, splits), doc["samples"]


def _parse_classes(classes: Any, path: Path) -> list[str]:
    if classes is None:
        return []
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise DataError(f'manifest {path}: "classes" must be a non-empty list of names, got {classes!r}',
                        'e.g. "classes": ["cat", "dog"]')
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise DataError(f'manifest {path}: class name {dup[0]!r} is listed twice in "classes"', "list each class once")
    return classes


def _parse_num_classes(value: Any, classes: list[str], default: int, path: Path) -> int:
    if value is None:
        return len(classes) if classes else default
    if not _is_int(value) or value < 1:
        raise DataError(f'manifest {path}: "num_classes" must be a positive integer, got {value!r}',
                        'e.g. "num_classes": 10')
    if classes and value != len(classes):
        raise DataError(f'manifest {path}: "num_classes" is {value} but "classes" names {len(classes)}',
                        'drop "num_classes" or make it match "classes"')
    return value


def _parse_entry(i: int, raw: Any, header: _Header, real_root: Path) -> _Entry:
    if not isinstance(raw, dict):
        raise DataError(f"manifest entry {i} is a {type(raw).__name__}, not an object",
                        'write it as {"file": ..., "label": ..., "split": ...}')
    name = raw.get("file")
    where = f"manifest entry {i} ({name!r})"
    unknown = sorted(set(raw) - set(_ENTRY_KEYS))
    if unknown:
        raise DataError(f"{where} has unknown key {unknown[0]!r}", f"allowed keys: {', '.join(_ENTRY_KEYS)}")
    for key in ("file", "split"):
        if key not in raw:
            raise DataError(f'{where} is missing key "{key}"', 'every entry needs "file", "label" and "split"')
    split = raw["split"]
    if split not in header.splits:
        raise DataError(f"{where} has unknown split {split!r}",
                        f'use one of {", ".join(header.splits)}, or list it under "splits" in the manifest')
    text = {key: raw.get(key) for key in _TEXT_FIELDS}
    for key, value in text.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {key} must be a string, got {value!r}", f'e.g. "{key}": "a"')
    return _Entry(_parse_file(i, name, real_root), _parse_label(where, raw, split, header), split, text)


def _parse_file(i: int, name: Any, real_root: Path) -> FeatureFile:
    where = f"manifest entry {i} ({name!r})"
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: file must be a non-empty relative path", 'e.g. "file": "train/0001.npy"')
    posix = name.replace("\\", "/")  # a manifest written on Windows names the same files
    if posix.startswith("/") or (name[1:2] == ":" and name[:1].isalpha()):  # /x, //server/x, C:\\x, C:x
        raise DataError(f"{where} has an absolute file path",
                        "write paths relative to the data root, so moving the data keeps sample ids stable")
    rel = posixpath.normpath(posix)
    # lexical here; symlinks leading out of the root are caught by `locate`, one folder listing for many files
    if rel == ".." or rel.startswith("../"):
        raise DataError(f"{where} points outside the data root {real_root}",
                        "keep every file (and any symlink's target) under the data root")
    if rel == ".":
        raise DataError(f"{where} names the data root itself, not a file", 'e.g. "file": "train/0001.npy"')
    check_suffix(rel, where)
    return FeatureFile(index=i, sample_id=rel, path=f"{real_root}{os.sep}{rel}")


def _parse_label(where: str, raw: dict[str, Any], split: str, header: _Header) -> int:
    label = raw.get("label")
    if "label" not in raw and split != "unlabeled":
        raise DataError(f'{where} is missing key "label"', 'give it a label, or "label": null in split "unlabeled"')
    if label is None:
        if split != "unlabeled":
            raise DataError(f"{where} has label null in split {split!r}",
                            'only split "unlabeled" may hold unlabelled samples; give it a label or move it')
        return UNLABELED
    if isinstance(label, str):
        if not header.classes:
            raise DataError(f"{where} has class name {label!r} as label but the manifest lists no classes",
                            'add "classes": [names...] to the manifest or use integer labels')
        if label not in header.classes:
            raise DataError(f"{where} has unknown class name {label!r}",
                            f"use one of the manifest's classes: {', '.join(header.classes)}")
        return header.classes[label]
    if not _is_int(label):
        raise DataError(f"{where} has label {label!r}, which is not an integer or class name",
                        f"use an integer in 0..{header.num_classes - 1}")
    if not 0 <= label < header.num_classes:
        raise DataError(f"{where} has label {label} out of range 0..{header.num_classes - 1}",
                        'fix the label or set "num_classes" (or data.num_classes) to the true class count')
    return label


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
