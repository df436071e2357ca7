"""The `kdtrack` command: one thin click command per stage; each turns options into a config and calls `run`."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from kdtrack import __version__, config
from kdtrack.errors import BadInput, KdtrackError


def _fail(exc: KdtrackError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def expected_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a KdtrackError into one `error: <what> — <how to fix>` line and its exit code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdtrackError as exc:
            _fail(exc)

    return wrapper


def config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--config FILE, --set key=value (repeatable) and --overrides "k=v k=v" (for MLproject parameters)."""
    fn = click.option("--overrides", default="", help='Space-separated key=value overrides, e.g. "optim.lr=0.1 seed=1".')(fn)
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config value, e.g. optim.lr=0.1.")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="YAML file of overrides over the defaults, e.g. experiments/digits.yaml.")(fn)


def load_config(config_path: str | None, sets: tuple[str, ...], overrides: str) -> config.Config:
    return config.load(config_path, [*overrides.split(), *sets])


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
        cfg = tracking.load_run_config(resume_run_id, config.Config)
    else:
        cfg = load_config(config_path, sets, overrides)
    run_id = stage.run(cfg, resume_run_id=resume_run_id)
    click.echo(run_id)
