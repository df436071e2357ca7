"""The `kdtrack` command: one thin click command per stage; each turns options into a config and calls `run`."""
from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from kdtrack import __version__, config, output
from kdtrack.errors import BadInput, KdtrackError


def _fail(exc: KdtrackError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, container stops, batch schedulers), handled like Ctrl-C: the run ends KILLED."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def expected_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a KdtrackError into one `error: <what> — <how to fix>` line and its exit code, no traceback; SIGTERM
    ends the command like Ctrl-C (its run KILLED, resumable) with exit code 143. Stdout carries only the command's
    result (kdtrack.output): anything else printed meanwhile (MLflow's links over HTTP) goes to stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            with output.results_only():
                return fn(*args, **kwargs)
        except KdtrackError as exc:
            _fail(exc)
        except Terminated:
            click.echo("terminated (SIGTERM): the run was ended KILLED; continue it with --resume RUN_ID", err=True)
            sys.exit(128 + signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config FILE, --set key=value (repeatable) and --overrides "k=v k=v" (for MLproject parameters)."""
    fn = click.option("--overrides", default="", help='Space-separated key=value overrides, e.g. "optim.lr=0.1 seed=1".')(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config value, e.g. optim.lr=0.1.")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="YAML file of overrides over the defaults, e.g. experiments/digits.yaml.")(fn)


def load_config(config_path: str | None, sets: tuple[str, ...], overrides: str,
                extra: list[str] | None = None) -> config.Config:
    """The config file, then --overrides, then --set, then options that a command maps onto config keys."""
    return config.load(config_path, [*overrides.split(), *sets, *(extra or [])])


def run_ids(values: tuple[str, ...]) -> list[str]:
    """Run ids from repeated options, each of which may also hold several ids separated by commas or spaces."""
    return [run_id for raw in values for run_id in raw.replace(",", " ").split()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdtrack")
def main() -> None:
    """Knowledge-distillation experiments as tracked MLflow runs.

    Runs go to MLFLOW_TRACKING_URI, or to ./mlflow.db (artifacts in ./mlruns) when it is unset.
    """


@main.command("train-teacher")
@config_options
@click.option("--resume", "resume_run_id", default=None, metavar="RUN_ID",
              help="Continue an interrupted teacher run from its checkpoints/last.pt, with the run's own config.")
@expected_errors
def train_teacher(config_path: str | None, sets: tuple[str, ...], overrides: str, resume_run_id: str | None) -> None:
    """Train a teacher; logs checkpoints/best.pt and checkpoints/last.pt."""
    # Imported here so that `kdtrack --help` does not pay for torch and mlflow.
    from kdtrack import tracking
    from kdtrack.stages import train_teacher as stage

    if resume_run_id:
        if config_path or sets or overrides:
            raise BadInput("--resume takes the run's own config", "drop --config/--set/--overrides")
        tracking.check_writable(tracking.get_run(resume_run_id), stage.STAGE)  # before anything else is read
        cfg = tracking.load_run_config(resume_run_id, config.Config)
    else:
        cfg = load_config(config_path, sets, overrides)
    run_id = stage.run(cfg, resume_run_id=resume_run_id)
    output.result(run_id)


@main.command("register-teacher")
@config_options
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model", required=True, metavar="DEFINITION",
              help="torchvision:<name>, timm:<name> (random init; weights from FILES) or package.module:Class.")
@click.option("--model-kwargs", default="{}", metavar="JSON",
              help='Keyword arguments of the model, e.g. \'{"width": 64}\'.')
@click.option("--input-shape", required=True, metavar="C,H,W", help="Shape of one input sample, e.g. 3,32,32.")
@click.option("--num-classes", default="auto", show_default=True, metavar="N|auto",
              help="Class count (needed for torchvision/timm; auto: read from the output of a user class).")
@click.option("--normalisation", required=True, metavar="none|MEAN/STD",
              help="What the teacher's inputs were normalised with: none, or MEAN/STD, each one value or one per "
                   "channel, e.g. 0.485,0.456,0.406/0.229,0.224,0.225.")
@click.option("--name", "names", multiple=True, help="Run name per file (default: teacher-<file stem>).")
@expected_errors
def register_teacher(config_path: str | None, sets: tuple[str, ...], overrides: str, files: tuple[str, ...],
                     model: str, model_kwargs: str, input_shape: str, num_classes: str, normalisation: str,
                     names: tuple[str, ...]) -> None:
    """Register checkpoints trained elsewhere as teacher runs; prints one run id per file."""
    from kdtrack.stages import register_teacher as stage

    definition = stage.Definition(model=model, kwargs=_json_object(model_kwargs, "--model-kwargs"),
                                  input_shape=_shape(input_shape), num_classes=_classes(num_classes),
                                  normalisation=_normalisation(normalisation))
    cfg = load_config(config_path, sets, overrides)
    for run_id in stage.run(cfg, list(files), definition, list(names) or None):
        output.result(run_id)


def _json_object(text: str, option: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{option} is not JSON: {exc}", f'e.g. {option} \'{{"num_classes": 10}}\'') from exc
    if not isinstance(value, dict):
        raise BadInput(f"{option} must be a JSON object, got {text}", f'e.g. {option} \'{{"num_classes": 10}}\'')
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise BadInput(f"--input-shape {text!r} is not a list of positive sizes", "e.g. --input-shape 3,32,32")
    return shape


def _classes(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 2:
        raise BadInput(f"--num-classes {text!r} is not a class count >= 2", "e.g. --num-classes 10, or auto")
    return int(text)


def _normalisation(text: str) -> Any:
    from kdtrack.data import Normalisation

    if text == "none":
        return Normalisation(0.0, 1.0)
    mean, _, std = text.partition("/")
    try:
        means, stds = [float(m) for m in mean.split(",")], [float(s) for s in std.split(",")]
    except ValueError:
        means = stds = []
    if not means or len(means) != len(stds):
        raise BadInput(f"--normalisation {text!r} is not none or MEAN/STD with as many stds as means",
                       "e.g. --normalisation 0.5/0.25 or --normalisation 0.485,0.456,0.406/0.229,0.224,0.225")
    if len(means) == 1:
        return Normalisation.from_dict({"mean": means[0], "std": stds[0]})
    return Normalisation.from_dict({"mean": means, "std": stds})


def _cache_overrides(dtype: str | None, checkpoint: str | None, splits: tuple[str, ...],
                     allow: tuple[str, ...]) -> list[str]:
    """Command-line cache options as config overrides, so the resolved config logs them."""
    out = [f"cache.dtype={dtype}"] if dtype else []
    out += [f"cache.checkpoint={checkpoint}"] if checkpoint else []
    out += [f"cache.splits=[{','.join(splits)}]"] if splits else []
    out += [f"cache.allow_splits=[{','.join(allow)}]"] if allow else []
    return out


@main.command("cache-logits")
@config_options
@click.option("--teacher-run-id", "teacher_run_ids", multiple=True, required=True, metavar="RUN_ID",
              help="Teacher run to cache; repeat for several teachers (one cache run each, under one parent).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None, help="Storage dtype (cache.dtype).")
@click.option("--checkpoint", type=click.Choice(["best", "last"]), default=None,
              help="Which checkpoint of the teacher (cache.checkpoint, default best).")
@click.option("--split", "splits", multiple=True, metavar="NAME",
              help="Split to cache (repeatable; default: train and unlabeled).")
@click.option("--allow-split", "allow", multiple=True, metavar="NAME",
              help="Allow caching a held-out split such as val or test (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild even if a finished cache with the same key exists.")
@click.option("--no-resume", is_flag=True, help="Start the store afresh instead of resuming an interrupted build.")
@expected_errors
def cache_logits(config_path: str | None, sets: tuple[str, ...], overrides: str, teacher_run_ids: tuple[str, ...],
                 dtype: str | None, checkpoint: str | None, splits: tuple[str, ...], allow: tuple[str, ...],
                 force: bool, no_resume: bool) -> None:
    """Cache teacher logits into a Zarr store logged as the run artifact logits.zarr; prints the cache run ids."""
    from kdtrack.stages import cache_logits as stage

    cfg = load_config(config_path, sets, overrides, _cache_overrides(dtype, checkpoint, splits, allow))
    for run_id in stage.run_many(cfg, run_ids(teacher_run_ids), force=force, resume=not no_resume):
        output.result(run_id)


@main.command("verify-cache")
@click.option("--run-id", "run_id", required=True, metavar="RUN_ID", help="The cache run to verify.")
@click.option("--recompute", type=click.IntRange(min=0), default=64, show_default=True,
              help="Re-run the teacher on this many random rows and compare (fidelity).")
@click.option("--repair", is_flag=True, help="Rebuild only the chunks found bad or not done.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for picking the recomputed rows.")
@expected_errors
def verify_cache(run_id: str, recompute: int, repair: bool, seed: int) -> None:
    """Check a cache: coverage, chunk checksums, NaN/Inf, fidelity to the teacher. Exit 0 only when all pass."""
    from kdtrack.errors import CacheError
    from kdtrack.stages import verify as stage

    verdict = stage.run(run_id, recompute=recompute, repair=repair, seed=seed)
    for line in verdict.lines:
        output.result(line)
    rebuild = "build a new cache with kdtrack cache-logits"
    if verdict.refusal:
        raise CacheError(f"cache run {run_id} cannot be repaired: {verdict.refusal}",
                         f"a repair only rebuilds chunks of the same data and checkpoint; {rebuild}")
    if not verdict.passed:
        raise CacheError(f"cache run {run_id} failed verification (see the report above)",
                         "--repair rebuilds the bad or unfinished chunks" if verdict.repairable else
                         f"the data, the teacher checkpoint or the store changed: {rebuild}")


@main.command("recompute-logits")
@config_options
@click.option("--teacher-run-id", "expert_run_ids", multiple=True, required=True, metavar="RUN_ID",
              help="Expert (teacher) run; repeatable.")
@click.option("--splits", "first_split", required=True, metavar="SPLIT [SPLIT ...]",
              help="Splits to compute: names in the data, or <name>_indices.json files.")
@click.argument("more_splits", nargs=-1, metavar="")
@click.option("--export-npz", type=click.Path(file_okay=False), default=None,
              help="Write <DIR>/<expert>/<split>_logits.npz with logits, targets, predictions.")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fail a split whose accuracy is below this.")
@expected_errors
def recompute_logits(config_path: str | None, sets: tuple[str, ...], overrides: str, expert_run_ids: tuple[str, ...],
                     first_split: str, more_splits: tuple[str, ...], export_npz: str | None,
                     min_accuracy: float) -> None:
    """Logits of saved experts on new splits, one verified cache per (expert, split), without retraining."""
    from kdtrack.errors import CacheError
    from kdtrack.stages import recompute_logits as stage

    cfg = load_config(config_path, sets, overrides)
    splits = [s for raw in (first_split, *more_splits) for s in raw.split()]  # MLproject passes one string
    checks = stage.run(cfg, list(expert_run_ids), splits, export_npz=export_npz, min_accuracy=min_accuracy)
    output.result(f"{'expert':34} {'split':10} {'rows':>7} {'accuracy':>9}  cache run / problems")
    for c in checks:
        status = c.cache_run_id if c.passed else "FAIL: " + "; ".join(c.problems)
        output.result(f"{c.expert_run_id:34} {c.split:10} {c.rows:7d} {c.accuracy:9.4f}  {status}")
    failed = [c for c in checks if not c.passed]
    if failed:
        raise CacheError(f"{len(failed)} of {len(checks)} expert/split checks failed", "see the table above")


@main.command("train-student")
@config_options
@click.option("--teacher-run-id", "teacher_run_ids", multiple=True, metavar="RUN_ID",
              help="Teacher run; repeat for several (fused by kd.fusion). Optional for --set method=none.")
@click.option("--build-missing-cache", is_flag=True, help="Build a teacher's cache when none matches, instead of stopping.")
@click.option("--resume", "resume_run_id", default=None, metavar="RUN_ID",
              help="Continue an interrupted student run from its last.pt, with the run's own config and teachers.")
@click.option("--register", default="", metavar="NAME",
              help="Register the student's MLflow model (runs:/<run>/model) as a new version of NAME.")
@expected_errors
def train_student(config_path: str | None, sets: tuple[str, ...], overrides: str, teacher_run_ids: tuple[str, ...],
                  build_missing_cache: bool, resume_run_id: str | None, register: str) -> None:
    """Train a student from cached teacher logits (or live teachers); prints the student run id."""
    from kdtrack import tracking
    from kdtrack.stages import train_student as stage

    ids = run_ids(teacher_run_ids)
    if resume_run_id:
        if config_path or sets or overrides or ids:
            raise BadInput("--resume takes the run's own config and teachers", "drop the other options")
        resumed = tracking.get_run(resume_run_id)
        tracking.check_writable(resumed, stage.STAGE)  # before anything else is read
        cfg = tracking.load_run_config(resume_run_id, config.Config)
        ids = run_ids((resumed.data.tags.get(f"{tracking.TAG}teacher_run_ids", ""),))
        caches = run_ids((resumed.data.tags.get(f"{tracking.TAG}cache_run_ids", ""),))  # the ones it read so far
    else:
        cfg, caches = load_config(config_path, sets, overrides), []
    run_id = stage.run(cfg, ids, build_missing_cache=build_missing_cache, resume_run_id=resume_run_id,
                       cache_run_ids=caches)
    if run_id:  # under torchrun only rank 0 has one
        if register:
            from kdtrack import mlflow_model

            mlflow_model.register(run_id, register)
        output.result(run_id)


@main.command("lineage")
@click.argument("run_id")
@expected_errors
def lineage(run_id: str) -> None:
    """Print where a run's inputs came from: student -> caches -> teachers -> datasets."""
    from kdtrack.lineage import describe

    for line in describe(run_id):
        output.result(line)


@main.command("pipeline")
@config_options
@click.option("--students", default="kd,none", show_default=True, help="Student methods, comma-separated.")
@click.option("--force", type=click.Choice(["teacher", "cache", "students"]), default=None,
              help="Rerun this step and every step after it, even if a finished run could be reused.")
@click.option("--register", default="", metavar="NAME",
              help="Register the first student's MLflow model as a new version of NAME.")
@expected_errors
def pipeline(config_path: str | None, sets: tuple[str, ...], overrides: str, students: str, force: str | None,
             register: str) -> None:
    """Teacher -> cache -> students under one parent run, reusing finished steps; prints a summary table."""
    from kdtrack.stages import pipeline as stage

    cfg = load_config(config_path, sets, overrides)
    methods = [m.strip() for m in students.split(",") if m.strip()]
    for method in methods:
        config.override(cfg, [f"method={method}"])  # an unknown method fails here, before any run starts
    output.result(stage.run(cfg, methods, force=force, register=register or None))


@main.command("sweep")
@config_options
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...", help="A config key and its values; repeatable.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma-separated.")
@click.option("--teacher-run-id", "teacher_run_ids", multiple=True, metavar="RUN_ID",
              help="Distil from this teacher run (repeat for several, fused by kd.fusion) instead of training the "
                   "config's teacher; its cache is reused or built.")
@click.option("--force-restart", is_flag=True, help="Rerun every combination, finished or not.")
@expected_errors
def sweep(config_path: str | None, sets: tuple[str, ...], overrides: str, grid: tuple[str, ...], seeds: str,
          teacher_run_ids: tuple[str, ...], force_restart: bool) -> None:
    """Student runs for every grid combination and seed under one parent; prints mean ± std over seeds."""
    from kdtrack.stages import sweep as stage

    cfg = load_config(config_path, sets, overrides)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError as exc:
        raise BadInput(f"--seeds {seeds!r} is not a list of integers", "e.g. --seeds 0,1,2") from exc
    if not seed_list:
        raise BadInput(f"no seeds given in --seeds {seeds!r}", "e.g. --seeds 0,1,2")
    parsed = stage.parse_grid(list(grid))
    for combo in parsed.items():  # every value type-checks before any run starts
        for value in combo[1]:
            config.override(cfg, [f"{combo[0]}={value}"])
    output.result(stage.run(cfg, parsed, seed_list, force_restart=force_restart,
                            teacher_run_ids=run_ids(teacher_run_ids)))


@main.command("fetch")
@click.option("--run-id", required=True, metavar="RUN_ID", help="A teacher, student or cache run.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to put the artifacts in.")
@expected_errors
def fetch(run_id: str, out: str) -> None:
    """Download a run's checkpoints or logit cache for use elsewhere; prints the local paths."""
    from kdtrack.fetch import fetch as do_fetch

    for path in do_fetch(run_id, out):
        output.result(path)
