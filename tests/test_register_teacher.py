"""Teachers trained elsewhere: checkpoints written by plain PyTorch, registered as teacher runs, used by every stage."""
from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import zarr
from torch import nn

from kdtrack import checkpoint, config, external, lineage, tracking
from kdtrack.data import build_dataset
from kdtrack.errors import CheckpointError, ModelError
from kdtrack.stages import cache_logits, register_teacher
from kdtrack.teachers import load_teacher
from conftest import DIGITS, cli, set_args, subprocess_env
from test_mlflow_model import LOADER

T = tracking.TAG
EXPERT_SOURCE = '''
"""Experts as another project writes them: its own class, its own training script, weights under model_state_dict."""
import torch
from torch import nn


class Expert(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10, channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(width * 4, classes)

    def forward(self, x):
        return self.head(self.features(x))
'''
DIGITS_NORM = ("8", "4")  # digits pixels are 0..16: the experts were trained on (x - 8) / 4


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A package `kdexperts` on sys.path and two expert checkpoints saved by plain torch.save: one with DDP's
    `module.` prefix under `model_state_dict`, one compiled (`_orig_mod.`) under `state_dict`."""
    root = tmp_path_factory.mktemp("experts")
    (root / "kdexperts").mkdir()
    (root / "kdexperts" / "__init__.py").write_text("")
    (root / "kdexperts" / "nets.py").write_text(textwrap.dedent(EXPERT_SOURCE))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    from kdexperts.nets import Expert

    models, files = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = Expert(width=6)
        with torch.no_grad():  # BatchNorm statistics that are not the defaults, so a lost buffer shows
            model.features[1].running_mean.uniform_(-1, 1)
            model.features[1].running_var.uniform_(0.5, 2)
        models[name] = model.eval()
        files[name] = root / "checkpoints" / f"best_{name}.pth"
        files[name].parent.mkdir(exist_ok=True)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in models["a"].state_dict().items()}, "epoch": 7},
               files["a"])
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in models["b"].state_dict().items()}, "acc": 0.9},
               files["b"])
    yield {"root": root, "models": models, "files": files}
    sys.path.remove(str(root))
    for module in [m for m in sys.modules if m.startswith("kdexperts")]:
        del sys.modules[module]


def _register(*files: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    return cli("register-teacher", *map(str, files), "--model", "kdexperts.nets:Expert",
               "--model-kwargs", '{"width": 6}', "--input-shape", "1,8,8", "--normalisation",
               "/".join(DIGITS_NORM), "--set", "experiment=registered", *extra)


def _by_hand(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The expert's own logits on raw digits, normalised here as its training script did."""
    with torch.no_grad():
        return model((torch.from_numpy(x) - float(DIGITS_NORM[0])) / float(DIGITS_NORM[1])).numpy()


@pytest.mark.slow  # registers two experts, each with its MLflow model (~1 s on 2 cores)
def test_two_experts_registered_at_once_are_teacher_runs_under_one_parent(store: str, experts: dict) -> None:
    code, out, err = _register(experts["files"]["a"], experts["files"]["b"])
    assert code == 0, err
    ids = out.split()
    assert len(ids) == 2  # one run id per file, in file order
    runs = [tracking.get_run(i) for i in ids]
    assert [r.info.run_name for r in runs] == ["teacher-best_a", "teacher-best_b"]
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert runs[1].data.tags["mlflow.parentRunId"] == parent_id
    parent = tracking.get_run(parent_id)
    assert parent.data.tags[f"{T}stage"] == register_teacher.GROUP_STAGE
    assert parent.data.tags[f"{T}teacher_run_ids"] == ",".join(ids)
    nets = experts["root"] / "kdexperts" / "nets.py"
    for run, name in zip(runs, "ab"):
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags[f"{T}stage"] == "teacher"
        assert tags[f"{T}source_file"] == str(experts["files"][name].resolve())
        assert tags[f"{T}source_sha256"] == hashlib.sha256(experts["files"][name].read_bytes()).hexdigest()
        assert tags[f"{T}model_definition"] == "kdexperts.nets:Expert"
        assert tags[f"{T}model_code_version"] == "sha256:" + hashlib.sha256(nets.read_bytes()).hexdigest()
        assert run.data.params["num_classes"] == "10" and run.data.params["input_shape"] == "1x8x8"
        # the checkpoint is kdtrack's own, weights-only, with the expert's weights unprefixed
        payload = checkpoint.load(tracking.artifact_path(run.info.run_id, "checkpoints/best.pt"))
        expected = experts["models"][name].state_dict()
        assert payload["state_dict"].keys() == expected.keys()
        assert all(torch.equal(payload["state_dict"][k], v) for k, v in expected.items())
        assert tags[f"{T}checkpoint_sha256"] == payload["weights_sha256"]
        assert payload["normalisation"] == {"mean": 8.0, "std": 4.0}
    printed = "\n".join(lineage.describe(ids[0]))
    assert f"registered from {experts['files']['a'].resolve()}" in printed and "kdexperts.nets:Expert" in printed


@pytest.mark.slow  # builds two caches and exports them
def test_registered_experts_are_recomputed_on_a_new_split_with_npz_export(store: str, experts: dict,
                                                                          tmp_path: Path) -> None:
    code, out, err = _register(experts["files"]["a"], experts["files"]["b"], extra=("--name", "exp-a", "--name", "exp-b"))
    assert code == 0, err
    ids = out.split()
    exports = tmp_path / "npz"
    code, out, err = cli("recompute-logits", "--config", str(DIGITS), *set_args("experiment=registered"),
                         *[a for i in ids for a in ("--teacher-run-id", i)], "--splits", "test",
                         "--export-npz", str(exports))
    assert code == 0, err
    test_rows = build_dataset(config.load(DIGITS).data).select(["test"])
    for run_id, name in zip(ids, "ab"):
        saved = np.load(_npz(exports, run_id))
        expected = _by_hand(experts["models"][name], test_rows.features)
        np.testing.assert_allclose(saved["logits"], expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(saved["targets"], test_rows.labels)


def _npz(folder: Path, run_id: str) -> Path:
    found = [p for p in folder.rglob("test_logits.npz") if run_id in str(p) or run_id[:8] in str(p)]
    assert len(found) == 1, sorted(folder.rglob("*"))
    return found[0]


@pytest.mark.slow  # a cache, its verification and a student
def test_a_registered_teacher_is_cached_verified_and_distilled_by_run_id(store: str, experts: dict) -> None:
    code, out, err = _register(experts["files"]["a"], extra=("--name", "expert-a-kd"))
    assert code == 0, err
    teacher_id = out.strip()
    sets = set_args("experiment=registered", "student.optim.epochs=1", "train.progress=off")
    code, out, err = cli("cache-logits", "--config", str(DIGITS), *sets, "--teacher-run-id", teacher_id)
    assert code == 0, err
    cache_id = out.strip()
    store_path = tracking.artifact_path(cache_id, cache_logits.ARTIFACT)
    logits = np.asarray(zarr.open_group(store_path, mode="r")["logits"][:])
    rows = cache_logits.cache_rows(config.load(DIGITS), load_teacher(teacher_id, torch.device("cpu")))
    expected = _by_hand(experts["models"]["a"], rows.features)  # raw features: normalised by hand
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    code, out, err = cli("verify-cache", "--run-id", cache_id, "--recompute", "16")
    assert code == 0, err
    code, out, err = cli("train-student", "--config", str(DIGITS), *sets, "--teacher-run-id", teacher_id)
    assert code == 0, err
    student = tracking.get_run(out.strip())
    assert student.data.tags[f"{T}teacher_run_ids"] == teacher_id
    assert student.data.tags[f"{T}cache_run_ids"] == cache_id


# ---------------------------------------------------------------- what a foreign checkpoint may hold

def test_state_dicts_are_found_nested_and_unprefixed() -> None:
    weights = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    for saved in (weights, {"model": weights, "epoch": 3}, {"model_state_dict": weights, "optimizer": {"lr": 0.1}},
                  {"state_dict": {f"module._orig_mod.{k}": v for k, v in weights.items()}},
                  {f"_orig_mod.module.{k}": v for k, v in weights.items()}):
        found = external.state_dict_of(saved, "f.pth")
        assert found.keys() == weights.keys() and all(found[k] is weights[k] for k in weights)
    # a prefix only some keys carry is part of the names, not a wrapper's
    mixed = {"module.fc.weight": torch.ones(1), "head.bias": torch.ones(1)}
    assert external.state_dict_of(mixed, "f.pth").keys() == mixed.keys()
    with pytest.raises(CheckpointError, match=r"f.pth holds no state dict: its keys are epoch, optimizer"):
        external.state_dict_of({"epoch": 3, "optimizer": {"lr": 0.1}}, "f.pth")


def test_weights_that_do_not_fit_name_the_keys_and_the_first_layer(store: str, experts: dict, tmp_path: Path) -> None:
    state = experts["models"]["a"].state_dict()
    missing = tmp_path / "missing.pth"
    torch.save({"model_state_dict": {k: v for k, v in state.items() if k != "head.bias"}}, missing)
    code, out, err = _register(missing)
    assert code == 1 and out == ""
    assert "does not match its architecture: 1 missing keys (head.bias), 0 unexpected keys (none)" in err
    wider = tmp_path / "wider.pth"
    torch.save({**state, "head.weight": torch.zeros(10, 32)}, wider)
    code, out, err = _register(wider)
    assert code == 1 and "layer head.weight has shape (10, 32) in the checkpoint but (10, 24) in the model" in err
    assert not _runs_named("teacher-missing") and not _runs_named("teacher-wider")


def _runs_named(name: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_name = '{name}'",
                              output_format="list")


class _Trap:
    """Unpickling this object would write a file: the proof that a refused checkpoint ran nothing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_pickled_module_is_refused_without_running_it(store: str, experts: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickled = tmp_path / "whole_model.pth"
    torch.save({"model": experts["models"]["a"], "trap": _Trap(marker)}, pickled)
    code, out, err = _register(pickled)
    assert code == 1 and "was refused as unsafe" in err and out == ""
    assert not marker.exists()
    torch.load(pickled, weights_only=False)  # the trap is real: loading without weights_only springs it
    assert marker.read_text() == "unpickled"


def test_bad_definitions_fail_before_any_run(store: str, experts: dict, tmp_path: Path) -> None:
    file = str(experts["files"]["a"])
    base = ["register-teacher", file, "--input-shape", "1,8,8", "--normalisation", "none",
            "--set", "experiment=registered-refused"]
    code, _, err = cli(*base, "--model", "kdexperts.nowhere:Expert")
    assert code == 2 and "cannot import kdexperts.nowhere for model kdexperts.nowhere:Expert" in err
    code, _, err = cli(*base, "--model", "kdexperts.nets:Nobody")
    assert code == 2 and "has no class Nobody" in err
    code, _, err = cli(*base, "--model", "resnet 18")
    assert code == 2 and "is not of the form torchvision:<name>" in err
    code, _, err = cli(*base, "--model", "torchvision:resnet18")
    assert code == 2 and "torchvision:resnet18 needs the class count" in err
    code, _, err = cli(*base, "--model", "kdexperts.nets:Expert", "--model-kwargs", '{"width": 6}', "--num-classes", "3")
    assert code == 2 and "outputs 10 classes, not the 3 given" in err
    code, _, err = cli(*base[:3], "1,9", *base[4:], "--model", "kdexperts.nets:Expert", "--model-kwargs", '{"width": 6}')
    assert code == 2 and "kdexperts.nets:Expert does not take inputs of shape (1, 9)" in err
    code, _, err = cli(*base[:5], "8,8/4,4", *base[6:], "--model", "kdexperts.nets:Expert",
                       "--model-kwargs", '{"width": 6}')
    assert code == 2 and "the normalisation has 2 channels but inputs of shape (1, 8, 8) have 1" in err
    code, _, err = cli(*base[:5], "8/0", *base[6:], "--model", "kdexperts.nets:Expert")
    assert code == 2 and "needs a finite mean and a positive std" in err
    assert not mlflow.search_experiments(filter_string="name = 'registered-refused'")


def test_a_changed_model_class_is_refused_where_the_teacher_is_loaded(store: str, experts: dict,
                                                                      tmp_path: Path) -> None:
    package = tmp_path / "kdmoving"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(EXPERT_SOURCE))
    sys.path.insert(0, str(tmp_path))
    try:
        code, out, err = cli("register-teacher", str(experts["files"]["a"]), "--model", "kdmoving.nets:Expert",
                             "--model-kwargs", '{"width": 6}', "--input-shape", "1,8,8", "--normalisation", "8/4",
                             "--set", "experiment=registered")
        assert code == 0, err
        before = "sha256:" + hashlib.sha256((package / "nets.py").read_bytes()).hexdigest()
        (package / "nets.py").write_text(textwrap.dedent(EXPERT_SOURCE) + "\nSCALE = 2\n")
        after = "sha256:" + hashlib.sha256((package / "nets.py").read_bytes()).hexdigest()
        code, _, err = cli("cache-logits", "--config", str(DIGITS), "--teacher-run-id", out.strip(),
                           "--set", "experiment=registered")
        assert code == 2
        assert f"was registered with kdmoving.nets:Expert at {before[:19]} but that code is now {after[:19]}" in err
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith("kdmoving")]:
            del sys.modules[module]


def test_per_channel_normalisation_standardises_each_channel() -> None:
    from kdtrack.data import Normalisation

    norm = Normalisation.from_dict({"mean": [1.0, 2.0, 3.0], "std": [1.0, 2.0, 4.0]})
    x = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2)
    by_hand = torch.stack([(x[0] - 1) / 1, (x[1] - 2) / 2, (x[2] - 3) / 4])
    assert torch.allclose(norm.apply(x), by_hand)
    mean, scale = norm.terms(3)
    assert torch.allclose((x.unsqueeze(0).repeat(2, 1, 1, 1) - mean) * scale, by_hand.expand(2, 3, 2, 2))
    assert norm.to_dict() == {"mean": [1.0, 2.0, 3.0], "std": [1.0, 2.0, 4.0]}
    assert Normalisation.from_dict(norm.to_dict()) == norm


def _import_problem(package: str) -> str | None:
    """Why `package` cannot be imported here, with where its tests run instead; None when it imports."""
    try:
        importlib.import_module(package)
    except Exception as exc:  # not installed, or a wheel built for another torch (CUDA vs CPU) that fails to load
        first_line = (str(exc).splitlines() or [""])[0]
        return (f"{package} cannot be imported here ({type(exc).__name__}: {first_line}); "
                "`make test-extras` runs this test in .venv-extras")
    return None


TORCHVISION_PROBLEM = _import_problem("torchvision")
TIMM_PROBLEM = _import_problem("timm")


def _cache_is_the_models_own_output(data: list[str], teacher_id: str, model: torch.nn.Module, mean: list[float],
                                   std: list[float]) -> str:
    """Cache the teacher over `data`: the logits must be `model`'s own outputs on the rows normalised here, channel
    by channel. Returns the cache run id."""
    code, out, err = cli("cache-logits", *set_args(*data), "--teacher-run-id", teacher_id)
    assert code == 0, err
    cache_id = out.strip()
    logits = np.asarray(zarr.open_group(tracking.artifact_path(cache_id, cache_logits.ARTIFACT), mode="r")["logits"][:])
    rows = cache_logits.cache_rows(config.load(None, data), load_teacher(teacher_id, torch.device("cpu")))
    x = torch.from_numpy(rows.features)
    with torch.no_grad():
        expected = model((x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)).numpy()
    assert expected.std(axis=0).min() > 1e-2  # logits that differ between rows: a wrong input would show
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    return cache_id


@pytest.mark.extras
@pytest.mark.slow  # a ResNet-18 cached, verified and distilled
@pytest.mark.skipif(TORCHVISION_PROBLEM is not None, reason=str(TORCHVISION_PROBLEM))
def test_a_torchvision_resnet18_saved_by_plain_pytorch_is_a_teacher(store: str, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    file = tmp_path / "resnet18.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, file)
    data = ["data.source=synthetic", "data.input_shape=[3,16,16]", "data.num_samples=96", "experiment=registered-tv",
            "student.model.name=mlp", "student.optim.epochs=1", "train.progress=off"]
    code, out, err = cli("register-teacher", str(file), "--model", "torchvision:resnet18", "--num-classes", "10",
                         "--input-shape", "3,16,16", "--normalisation", "0.1,0.2,0.3/1,2,4",
                         *set_args("experiment=registered-tv"))
    assert code == 0, err
    teacher_id = out.strip()
    cache_id = _cache_is_the_models_own_output(data, teacher_id, model, [0.1, 0.2, 0.3], [1.0, 2.0, 4.0])

    assert cli("verify-cache", "--run-id", cache_id, "--recompute", "16")[0] == 0
    code, out, err = cli("train-student", *set_args(*data), "--teacher-run-id", teacher_id)
    assert code == 0, err
    assert tracking.get_run(out.strip()).data.tags[f"{T}cache_run_ids"] == cache_id


@pytest.mark.extras
@pytest.mark.slow  # a cache and its verification
@pytest.mark.skipif(TIMM_PROBLEM is not None, reason=str(TIMM_PROBLEM))
def test_a_timm_vit_saved_compiled_is_a_teacher_built_with_its_kwargs(store: str, tmp_path: Path) -> None:
    """A tiny timm ViT for 16x16 inputs (4x4 patches: `--model-kwargs` reach timm.create_model when the teacher is
    registered and again when it is loaded), saved as torch.compile names its weights, under `state_dict`."""
    import timm

    torch.manual_seed(4)
    kwargs = {"img_size": 16, "patch_size": 4}
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, **kwargs).eval()
    file = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, file)
    data = ["data.source=synthetic", "data.input_shape=[3,16,16]", "data.num_samples=64", "experiment=registered-timm"]
    code, out, err = cli("register-teacher", str(file), "--model", "timm:test_vit", "--num-classes", "10",
                         "--model-kwargs", json.dumps(kwargs), "--input-shape", "3,16,16",
                         "--normalisation", "0.5,-0.5,0/0.5,1,2", *set_args("experiment=registered-timm"))
    assert code == 0, err
    teacher_id = out.strip()
    assert tracking.get_run(teacher_id).data.tags[f"{T}model_code_version"] == f"timm {timm.__version__}"
    cache_id = _cache_is_the_models_own_output(data, teacher_id, model, [0.5, -0.5, 0.0], [0.5, 1.0, 2.0])
    code, out, err = cli("verify-cache", "--run-id", cache_id, "--recompute", "16")
    assert code == 0, err


def test_a_registered_teacher_is_fetched_and_refused_on_data_of_another_shape(store: str, experts: dict,
                                                                              tmp_path: Path) -> None:
    code, out, err = _register(experts["files"]["a"], extra=("--name", "expert-a-fetch"))
    assert code == 0, err
    teacher_id = out.strip()
    code, out, err = cli("fetch", "--run-id", teacher_id, "--out", str(tmp_path))
    assert code == 0, err
    fetched = torch.load(tmp_path / teacher_id / "checkpoints" / "best.pt", weights_only=True)
    assert all(torch.equal(fetched["state_dict"][k], v) for k, v in experts["models"]["a"].state_dict().items())
    before = len(_runs_named("cache-expert-a-fetch"))
    code, _, err = cli("cache-logits", "--teacher-run-id", teacher_id,
                       *set_args("data.source=synthetic", "data.input_shape=[1,6,6]", "experiment=registered"))
    assert code == 2 and f"teacher run {teacher_id} takes inputs of shape (1, 8, 8) but the data's samples have " \
                         "shape (1, 6, 6)" in err
    assert len(_runs_named("cache-expert-a-fetch")) == before  # refused before any run started


@pytest.mark.slow  # a cache and its verification
def test_per_channel_normalisation_reaches_the_registered_teacher(store: str, experts: dict, tmp_path: Path) -> None:
    """Three-channel inputs, one mean and std per channel: the cached logits are the expert's own outputs on inputs
    normalised channel by channel here, and the cache key holds the per-channel statistics."""
    from kdexperts.nets import Expert

    torch.manual_seed(3)
    model = Expert(width=4, classes=5, channels=3).eval()
    file = tmp_path / "rgb_expert.pth"
    torch.save({"model": model.state_dict()}, file)
    data = ["data.source=synthetic", "data.input_shape=[3,6,6]", "data.num_classes=5", "data.num_samples=80",
            "experiment=registered"]
    code, out, err = cli("register-teacher", str(file), "--model", "kdexperts.nets:Expert", "--model-kwargs",
                         '{"width": 4, "classes": 5, "channels": 3}', "--input-shape", "3,6,6",
                         "--normalisation", "0.5,-1,2/1,0.5,4", *set_args("experiment=registered"))
    assert code == 0, err
    teacher_id = out.strip()
    code, out, err = cli("cache-logits", *set_args(*data), "--teacher-run-id", teacher_id)
    assert code == 0, err
    group = zarr.open_group(tracking.artifact_path(out.strip(), cache_logits.ARTIFACT), mode="r")
    rows = cache_logits.cache_rows(config.load(None, data), load_teacher(teacher_id, torch.device("cpu")))
    x = torch.from_numpy(rows.features)
    mean, std = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1), torch.tensor([1.0, 0.5, 4.0]).view(3, 1, 1)
    with torch.no_grad():
        expected = model((x - mean) / std).numpy()
    np.testing.assert_allclose(np.asarray(group["logits"][:]), expected, rtol=1e-5, atol=1e-5)
    assert group.attrs["normalisation"] == {"mean": [0.5, -1.0, 2.0], "std": [1.0, 0.5, 4.0]}
    assert cli("verify-cache", "--run-id", out.strip(), "--recompute", "8")[0] == 0
    # its MLflow model loads in a fresh Python without the package on the path (the class ships with the model)
    # and predicts what the class does on inputs normalised channel by channel
    np.save(tmp_path / "x.npy", rows.features[:16])
    proc = subprocess.run([sys.executable, "-c", LOADER, f"runs:/{teacher_id}/model"], cwd=tmp_path,
                          env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y0.npy"), expected[:16], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("files", [1, 2])
def test_an_mlflow_run_launch_of_register_teacher_becomes_the_teacher_or_its_parent(store: str, experts: dict,
                                                                                  monkeypatch, files: int) -> None:
    """`mlflow run . -e register_teacher` creates a RUNNING run first: one file's teacher is that run, several
    files' parent is."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("registered") or client.get_experiment(
        client.create_experiment("registered"))
    launcher = client.create_run(experiment.experiment_id, tags={"mlflow.project.entryPoint": "register_teacher"})
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    names = [f"launched-{files}-{n}" for n in "ab"][:files]
    code, out, err = _register(*list(experts["files"].values())[:files], extra=tuple(a for n in names
                                                                                      for a in ("--name", n)))
    assert code == 0, err
    ids = out.split()
    run = tracking.get_run(launcher.info.run_id)
    assert run.info.status == "FINISHED"
    if files == 1:
        assert ids == [launcher.info.run_id] and run.data.tags[f"{T}stage"] == "teacher"
    else:
        assert run.data.tags[f"{T}stage"] == register_teacher.GROUP_STAGE
        assert run.data.tags[f"{T}teacher_run_ids"] == ",".join(ids) and launcher.info.run_id not in ids
