"""The only module that imports mlflow: stage runs, tags, params, metrics, datasets and artifacts."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import sqlalchemy.exc
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient

from kdtrack import __version__, claims, config, owners, store_health
from kdtrack.errors import BadInput, RunDeleted, RunFinished, RunNotFound, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG = "kdtrack."
MLFLOW_DIGEST_CHARS = 32  # MLflow's dataset digest column holds 36 characters; the full digest is a tag


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the embedded sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# MLflow retries an HTTP request 7 times with exponential backoff (minutes) and waits 120 s per attempt, so a
# mistyped or stopped server would look like a hang. Unless the user set these, fail within seconds instead.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


_checked_stores: set[tuple[str, str]] = set()
_clients: dict[tuple[str, int], MlflowClient] = {}
_MAX_CLIENTS = 8  # stores one process keeps a client for; the least recently made one goes first


def configure() -> MlflowClient:
    uri = tracking_uri()
    # MLflow draws a progress bar on stderr for every artifact download once tqdm is importable: a command's stderr
    # is its notes and one-line errors, and kdtrack reports its own long work
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith(("http://", "https://")):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    elif uri.startswith("sqlite:") and (uri, os.getcwd()) not in _checked_stores:
        store_health.check_sqlite_store(uri)  # once per store and folder in a process: configure() is called for every read
        _checked_stores.add((uri, os.getcwd()))
    _quiet_store_logs()
    mlflow.set_tracking_uri(uri)
    key = (uri, os.getpid())  # a forked process opens its own
    if key not in _clients:  # configure() runs for every read: one client per store, not one per call
        try:
            client = MlflowClient()  # opens a database store (creating its tables) on first use in a process
        except Exception as exc:
            if not _is_store_failure(exc):
                raise
            raise store_error(exc) from exc
        for old in [k for k in _clients if k[1] != key[1]]:
            del _clients[old]  # clients a parent process made before forking this one
        while len(_clients) >= _MAX_CLIENTS:
            del _clients[next(iter(_clients))]  # the oldest
        _clients[key] = client
    return _clients[key]


@dataclass
class StageRun:
    """The active run of one stage, with the client that writes to it."""

    run_id: str
    client: MlflowClient

    @classmethod
    def of(cls, run_id: str) -> StageRun:
        """An existing run (e.g. a finished cache run) to add metrics, tags or artifacts to."""
        return cls(run_id, configure())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batched request per call: all of an epoch's metrics at once."""
        stamp = _now_ms()
        batch = [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dataset(self, *, name: str, digest: str, context: str, source: dict[str, str],
                    digest_tag: str = "dataset_digest") -> None:
        """Show the dataset in the run's inputs, identified by a kdtrack hash: the dataset digest of its rows, or
        another (`digest_tag`, e.g. `cache_key` for a logit cache), whose full value goes into the source."""
        dataset = MetaDataset(
            CodeDatasetSource({**source, f"{TAG}{digest_tag}": digest}),
            name=name,
            digest=digest[:MLFLOW_DIGEST_CHARS],
        )
        mlflow.log_input(dataset, context=context)


# The `mlflow run` entry points that launch each stage: MLFLOW_RUN_ID is adopted only from a launch of one of them.
ENTRY_POINTS = {"teacher": ("train_teacher", "register_teacher"), "teacher-group": ("register_teacher",),
                "cache": ("cache_logits",), "cache-group": ("cache_logits",), "student": ("train_student",),
                "recompute": ("recompute_logits",), "pipeline": ("main",)}


@contextlib.contextmanager
def stage_run(stage: str, cfg: Any, *, run_name: str, description: str = "", resume_run_id: str | None = None,
              expect: dict[str, str] | None = None, same_config: bool = True,
              params: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """Start (or resume) a run of `stage`, nested under the active run if any; it ends FINISHED, or
    FAILED/KILLED if the body raises. A new run logs `params` (default: the whole config flattened) and the resolved
    config as `config.yaml`; a resumed run keeps the name and params it has.

    An existing run (`resume_run_id`, or the run of an `mlflow run` launch of this stage's entry point) is checked
    before anything is written to it: its stage, its state (never a FINISHED run, never one a live process owns),
    its config (unless not `same_config`: a cache run's key says what matters), and the tags in `expect` (e.g. the
    dataset digest)."""
    client = configure()
    _check_reachable(client)
    nested = mlflow.active_run() is not None
    launched = os.environ.pop("MLFLOW_RUN_ID", None)  # else mlflow.start_run would adopt it whatever it is
    run_id = resume_run_id
    if run_id is not None:
        check_writable(get_run(run_id), stage, expect, cfg if same_config else None)
    elif not nested and launched and _is_launch_of(launched, stage):
        check_writable(get_run(launched), stage, expect, cfg if same_config else None)
        run_id = launched
    if run_id is None and not nested:
        _use_experiment(client, cfg.experiment)
    elif run_id and not nested:  # the run's own experiment, whichever this process used before
        mlflow.set_experiment(experiment_id=get_run(run_id).info.experiment_id)
    try:
        active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
    except Exception as exc:
        if not _is_store_failure(exc):
            raise
        raise store_error(exc, TrackingError(f"cannot start a run on {tracking_uri()}: {_first_line(exc)}",
                                             "check the run id and MLFLOW_TRACKING_URI")) from exc
    run = StageRun(active.info.run_id, client)
    try:
        tags = {f"{TAG}stage": stage, f"{TAG}code_version": code_version(), f"{TAG}version": __version__,
                f"{TAG}owner": owners.me(), **_pending_tags.get(stage, {})}
        if description:
            tags["mlflow.note.content"] = description
        run.set_tags(tags)
        if not resume_run_id:
            _log_config(run, cfg, config.flatten(cfg) if params is None else params)
        yield run
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM (the CLI turns it into Terminated)
        _end_run("KILLED")
        raise
    except BaseException as exc:
        _end_run("FAILED")
        if isinstance(exc, Exception) and _is_store_failure(exc):
            raise store_error(exc) from exc  # e.g. the store locked mid-run: one line, and --resume works
        raise
    _end_run("FINISHED")


def _end_run(status: str) -> None:
    """End the active run; if the store fails even at that (e.g. it is locked), say so in one line: the run stays
    RUNNING until the next command finds its owner gone and marks it KILLED."""
    try:
        mlflow.end_run(status)
    except Exception as exc:
        if not _is_store_failure(exc):
            raise
        if status == "FINISHED":
            raise store_error(exc) from exc
        print(f"note: could not mark the run {status}: {store_error(exc).what}", file=sys.stderr)


_pending_tags: dict[str, dict[str, str]] = {}


@contextlib.contextmanager
def tagging(stage: str, tags: dict[str, str]) -> Iterator[None]:
    """Inside the block, every run of `stage` that starts is tagged with `tags` from its first write on (e.g. the
    pipeline's step key, so that an interrupted step is found again and resumed)."""
    _pending_tags[stage] = {**_pending_tags.get(stage, {}), **tags}
    try:
        yield
    finally:
        _pending_tags.pop(stage, None)


def check_writable(run: Any, stage: str, expect: dict[str, str] | None = None, cfg: Any = None) -> None:
    """Refuse to write to `run` as a `stage` run unless it is one: not deleted, of that stage, not FINISHED, not owned
    by a live process, its tags equal to `expect` and its logged config equal to `cfg`. Nothing is written here."""
    rid, name, tags = run.info.run_id, run.info.run_name, run.data.tags
    if run.info.lifecycle_stage == "deleted":
        raise RunDeleted(f"run {rid} ({name}) is deleted", f"restore it with `mlflow runs restore --run-id {rid}`, "
                         "or start a new run")
    found = tags.get(f"{TAG}stage")
    launched = tags.get("mlflow.project.entryPoint") in ENTRY_POINTS.get(stage, ())
    if found != stage and not (found is None and launched):
        what = f"a {found} run" if found else "not a kdtrack run"
        raise BadInput(f"run {rid} ({name}) is {what}, not a {stage} run; nothing was written to it",
                       f"pass the id of an unfinished {stage} run")
    if run.info.status == "FINISHED":
        raise RunFinished(f"run {rid} ({name}) is FINISHED; a finished run is never reopened, nothing was written",
                          "start a new run instead (without --resume)")
    owner = tags.get(f"{TAG}owner", "")
    if run.info.status == "RUNNING" and owner and owner != owners.me() and not owners.gone(owner):
        raise BadInput(f"run {rid} ({name}) is RUNNING in {owners.label(owner)}",
                       "wait for that process to end, or stop it first (it ends the run KILLED)")
    for key, want in (expect or {}).items():
        have = tags.get(key)
        if have is not None and have != want:
            raise BadInput(f"run {rid} ({name}) has {key}={short(have)} but this command has {short(want)}",
                           _EXPECT_HINTS.get(key.removeprefix(TAG), "start a new run instead"))
    if cfg is not None and found == stage:
        _check_same_config(rid, name, cfg)


_EXPECT_HINTS = {"dataset_digest": "the data changed since the run started: restore it, or start a new run",
                 "teacher_run_ids": "resume with the run's own teachers, or start a new run",
                 "cache_key": "start a new run for the new cache key"}


def short(value: str) -> str:
    """A sha256 hex digest as its first 12 digits (as messages quote them); any other value as it is."""
    return value[:12] if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value


def _check_same_config(run_id: str, name: str, cfg: Any) -> None:
    try:
        logged_cfg = load_run_config(run_id, type(cfg))
    except TrackingError:
        return  # a run that failed before its config was logged: nothing to compare with
    logged, now = config.flatten(logged_cfg), config.flatten(cfg)
    differ = [k for k, v in now.items() if logged.get(k) != v]
    if differ:
        shown = ", ".join(f"{k}: {logged.get(k)!r} -> {now[k]!r}" for k in differ[:3])
        raise BadInput(f"run {run_id} ({name}) was started with another config ({shown}"
                       f"{', ...' if len(differ) > 3 else ''})", "resume with the run's own config, or start a new run")


def _is_launch_of(run_id: str, stage: str) -> bool:
    """Whether MLFLOW_RUN_ID names the run `mlflow run` created for this stage's entry point; anything else (a
    stale id left in the environment) is ignored, with a note."""
    run = _run_or_none(configure(), run_id)
    ok = run is not None and run.data.tags.get("mlflow.project.entryPoint") in ENTRY_POINTS.get(stage, ()) \
        and run.info.status == "RUNNING"
    if not ok:
        print(f"note: ignoring MLFLOW_RUN_ID={run_id}: it is not a running `mlflow run` launch of the "
              f"{' or '.join(ENTRY_POINTS.get(stage, (stage,)))} entry point", file=sys.stderr)
    return ok


def note_reuse(stage: str, reused_run_id: str) -> None:
    """When launched by `mlflow run`, tag the launcher's run with the finished run that was reused instead."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher and launcher != reused_run_id and mlflow.active_run() is None and _is_launch_of(launcher, stage):
        StageRun.of(launcher).set_tags({f"{TAG}reused_run_id": reused_run_id,
                                        "mlflow.note.content": f"Reused finished {stage} run {reused_run_id}."})


def _use_experiment(client: MlflowClient, name: str) -> None:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            client.create_experiment(name)
        except MlflowException as exc:  # another process created it since: use that one
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        experiment = client.get_experiment_by_name(name)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)


def _log_config(run: StageRun, cfg: Any, values: dict[str, Any]) -> None:
    params = [Param(k, _param_value(v)) for k, v in values.items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        run.client.log_batch(run.run_id, params=params[start:start + 100])
    run.client.log_text(run.run_id, config.to_yaml(cfg), "config.yaml")


def run_link(run_id: str) -> str:
    """A markdown link to a run by name, `[name](#/experiments/<id>/runs/<run id>)`: the MLflow UI renders run
    descriptions as markdown, and this is the run's stable address there."""
    run = get_run(run_id)
    return f"[{run.info.run_name}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


def set_description(run_id: str, text: str) -> None:
    """Replace the run's description (markdown, shown on its page and in the runs table)."""
    StageRun.of(run_id).set_tags({"mlflow.note.content": text})


# A view of an experiment's runs table that the MLflow UI (3.x) loads from the experiment tag
# `mlflow.sharedViewState.<key>` when the page's URL has `?viewStateShareKey=<key>`: its `state` (a JSON string)
# holds search facets (`searchFilter`, `orderByKey`, ...) and table state (`selectedColumns`, ...).
VIEW_TAG = "mlflow.sharedViewState."
UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def save_runs_view(experiment: str, key: str, name: str, *, search_filter: str, params: list[str],
                   metrics: list[str], group_by_param: str = "") -> None:
    """Save a named view of `experiment`'s runs table (a filter, the param and metric columns shown, and rows grouped
    by a param's value, with averages per group), which the UI lists among its saved views and opens at
    `runs_view_url`. Grouped rows are listed flat; ungrouped, child runs hide under their collapsed parent."""
    client = configure()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise BadInput(f"no experiment named {experiment!r} in {tracking_uri()}", "run the pipeline first")
    columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
    state = {"searchFilter": search_filter, "orderByKey": "attributes.start_time", "orderByAsc": False,
             "selectedColumns": columns}
    if group_by_param:
        state["groupBy"] = {"aggregateFunction": "average",
                            "groupByKeys": [{"mode": "param", "groupByData": group_by_param}]}
    stamp = _now_ms()
    envelope = {"name": name, "createdAt": stamp, "updatedAt": stamp, "state": json.dumps(state)}
    client.set_experiment_tag(found.experiment_id, f"{VIEW_TAG}{key}", json.dumps(envelope))


def runs_view_url(experiment: str, key: str, base: str | None = None) -> str:
    """The address of the runs table of `experiment` opened on the saved view `key` (see `save_runs_view`), on
    `base` (default: the tracking server, or where `mlflow ui` serves for a local store)."""
    uri = tracking_uri()
    base = (base or (uri if uri.startswith(("http://", "https://")) else UI_URL)).rstrip("/")
    found = configure().get_experiment_by_name(experiment)
    if found is None:
        raise BadInput(f"no experiment named {experiment!r} in {tracking_uri()}", "run the pipeline first")
    return f"{base}/#/experiments/{found.experiment_id}/runs?viewStateShareKey={key}&compareRunsMode=TABLE"


def load_run_config(run_id: str, cls: type) -> Any:
    """The resolved config a run logged as `config.yaml`."""
    get_run(run_id)  # an unknown id is named as such, not as a run without config.yaml
    client = configure()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except MlflowException as exc:
            raise TrackingError(f"run {run_id} has no config.yaml artifact",
                                "resume only runs started by kdtrack") from exc
        return config.load(path, cls=cls)


def download_artifact(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Local path of a run's artifact (downloaded, or the file itself when the store is local)."""
    try:
        return Path(configure().download_artifacts(run_id, artifact_path, str(dst)))
    except MlflowException as exc:
        raise TrackingError(f"run {run_id} has no artifact {artifact_path}",
                            "check the run id with `mlflow ui` or `kdtrack lineage`") from exc


def list_artifacts(run_id: str, path: str) -> list[str]:
    """Paths of the artifacts directly under `path` of a run. Listed in the run's own artifact store: MLflow's
    listing by run id also searches the run's logged models, a query per call."""
    return [f.path for f in _artifact_repository(run_id).list_artifacts(path)]


def local_artifact_dir(run_id: str) -> Path | None:
    """The run's artifact folder when the artifact store is a local filesystem, else None."""
    repo = _artifact_repository(run_id)
    return Path(repo.artifact_dir) if isinstance(repo, LocalArtifactRepository) else None


def _artifact_repository(run_id: str) -> Any:
    configure()  # an mlflow-artifacts: URI is resolved against the tracking URI set here
    return get_artifact_repository(_artifact_uri(tracking_uri(), run_id))


@functools.lru_cache(maxsize=1024)
def _artifact_uri(store: str, run_id: str) -> str:
    """The artifact URI of a run of `store`: set when the run is created and never changed, so read once."""
    return get_run(run_id).info.artifact_uri


def artifact_path(run_id: str, path: str) -> Path:
    """A local path of a run's artifact: in place for a local store, else downloaded once per run."""
    local = local_artifact_dir(run_id)
    if local is not None:
        return local / path
    target = download_dir() / run_id
    downloaded = target / path
    done = target / f".{path.replace('/', '_')}.downloaded"
    if done.exists():
        return downloaded
    # One download per artifact at a time: DDP ranks and parallel jobs on one machine share the folder.
    with claims.claim(download_dir() / "claims", f"download-{run_id}-{path.replace('/', '_')}",
                      f"downloading {path} of run {run_id}"):
        if not done.exists():  # else another process finished it while this one waited
            downloaded.parent.mkdir(parents=True, exist_ok=True)
            # MLflow puts a downloaded file or folder under its last path component only (checkpoints/best.pt ->
            # <dst>/best.pt), so the destination is the artifact's own parent folder.
            download_artifact(run_id, path, downloaded.parent)
            done.touch()  # an interrupted download is simply repeated
    return downloaded


def download_dir() -> Path:
    """Where artifacts of remote stores are downloaded and remote cache builds are staged."""
    return Path(os.environ.get("KDTRACK_CACHE_DIR") or Path.home() / ".cache" / "kdtrack")


def find_runs(tags: dict[str, str], statuses: tuple[str, ...] = ("FINISHED",)) -> list[Any]:
    """Runs in any experiment whose tags equal `tags` and whose status is one of `statuses`, newest first."""
    client = configure()
    query = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = []
    for start in range(0, len(experiments), 100):  # search_runs takes at most 100 experiments
        runs += client.search_runs(experiments[start:start + 100], query, max_results=1000)
    runs = [settle(client, run) for run in runs]
    return sorted((r for r in runs if r.info.status in statuses), key=lambda r: -r.info.start_time)


def settle(client: MlflowClient, run: Any) -> Any:
    """`run`, marked KILLED first when it is RUNNING but the process that owned it on this host is gone (killed
    with SIGKILL, or the machine lost power): an orphan must neither block nor look like live work."""
    owner = run.data.tags.get(f"{TAG}owner", "")
    if run.info.status != "RUNNING" or not owner or not owners.gone(owner):
        return run
    client.set_tag(run.info.run_id, f"{TAG}ended_by", f"its owner ({owners.label(owner)}) was gone; marked KILLED "
                   f"by {owners.label(owners.me())}")
    client.set_terminated(run.info.run_id, "KILLED")
    print(f"note: run {run.info.run_id} ({run.info.run_name}) was RUNNING but its process ({owners.label(owner)}) "
          "is gone: marked KILLED", file=sys.stderr)
    return client.get_run(run.info.run_id)


def get_run(run_id: str) -> Any:
    """The run `run_id`; RunNotFound when the store does not know it, TrackingError when the store fails."""
    client = configure()
    try:
        return settle(client, client.get_run(run_id))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RunNotFound(f"run {run_id} not found in {tracking_uri()}",
                              "check the run id and MLFLOW_TRACKING_URI") from exc
        raise TrackingError(f"cannot read run {run_id} from {tracking_uri()}: {_first_line(exc)}",
                            "start the server or fix MLFLOW_TRACKING_URI") from exc


def code_version() -> str:
    """Git commit of the kdtrack source tree; `<commit>-dirty.<hash of the diff>` when tracked files changed, so
    two different sets of uncommitted changes never look alike; `unknown` outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = _git(here, "rev-parse", "HEAD")
        diff = _git(here, "diff", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty.{hashlib.sha256(diff.encode()).hexdigest()[:12]}" if diff else commit


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10)
    return out.stdout.strip()


def _check_reachable(client: MlflowClient) -> None:
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        if not _is_store_failure(exc):
            raise
        raise store_error(exc) from exc


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _now_ms() -> int:
    return int(time.time() * 1000)


def select_runs(experiment: str | None = None, tags: dict[str, str] | None = None, stage: str | None = None,
                run_ids: list[str] | None = None) -> list[Any]:
    """Runs that meet every criterion given (experiment name, tag values, kdtrack stage, run ids), oldest first.
    Run ids that do not exist and an experiment that does not exist simply match nothing."""
    client = configure()
    _check_reachable(client)
    wanted = {**(tags or {}), **({f"{TAG}stage": stage} if stage else {})}
    experiment_ids = None
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        experiment_ids = [found.experiment_id]
    if run_ids:
        runs = [run for run in (_run_or_none(client, i) for i in dict.fromkeys(run_ids)) if run is not None]
    else:
        # Values holding quotes cannot go into a filter string; they are still checked below.
        query = " AND ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items() if "'" not in v and "`" not in k)
        runs = _search_all(client, experiment_ids or [e.experiment_id for e in client.search_experiments()], query)
    runs = [settle(client, run) for run in runs]
    selected = [run for run in runs if all(run.data.tags.get(k) == v for k, v in wanted.items())
                and (experiment_ids is None or run.info.experiment_id in experiment_ids)]
    return sorted(selected, key=lambda run: (run.info.start_time or 0, run.info.run_id))


def experiment_names() -> list[str]:
    """Names of the active experiments in the tracking store."""
    return sorted(e.name for e in configure().search_experiments())


def metric_histories(keys_by_run: dict[str, list[str]], workers: int = 8) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """run id -> metric key -> [(step, value)] sorted by step, for the keys asked of each run. The per-metric reads
    go out concurrently, so a remote server costs one round trip per `workers` histories, not one per history."""
    client = configure()
    pairs = [(run_id, key) for run_id, keys in keys_by_run.items() for key in dict.fromkeys(keys)]
    out: dict[str, dict[str, list[tuple[int, float]]]] = {run_id: {} for run_id in keys_by_run}
    if not pairs:
        return out
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs)))) as pool:
            for (run_id, key), history in zip(pairs, pool.map(lambda p: client.get_metric_history(*p), pairs)):
                out[run_id][key] = _by_step(history)
    except MlflowException as exc:
        raise TrackingError(f"cannot read metric histories from {tracking_uri()}: {_first_line(exc)}",
                            "check MLFLOW_TRACKING_URI and that the server is up") from exc
    return out


def log_files(run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Log local files as artifacts under `artifact_path` of an existing run (finished or not)."""
    client = configure()
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def _run_or_none(client: MlflowClient, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _search_all(client: MlflowClient, experiment_ids: list[str], query: str) -> list[Any]:
    runs: list[Any] = []
    for start in range(0, len(experiment_ids), 100):  # search_runs takes at most 100 experiments
        token = None
        while True:
            page = client.search_runs(experiment_ids[start:start + 100], query, max_results=1000, page_token=token)
            runs += page
            token = page.token
            if not token:
                break
    return runs


def _by_step(history: list[Metric]) -> list[tuple[int, float]]:
    """One value per step: the latest logged, as a resumed run may log an epoch twice."""
    latest = {m.step: m for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
    return [(step, latest[step].value) for step in sorted(latest)]



# --- tracking store failures as one line (the checks that need no mlflow are in store_health.py) -----------------

def store_error(exc: BaseException, otherwise: TrackingError | None = None) -> TrackingError:
    """A failure of this process's tracking store as one line (see store_health.store_error)."""
    return store_health.store_error(exc, tracking_uri(), otherwise)


def _is_store_failure(exc: BaseException) -> bool:
    """Raised by MLflow or by the database layer under it (SQLAlchemy, sqlite3), not by a bug of ours."""
    return isinstance(exc, (MlflowException, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error))


def _quiet_store_logs() -> None:
    """MLflow logs a full traceback for a database error before raising it; kdtrack reports it as one line."""
    import logging

    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(f is _drop_db_error_traceback for f in logger.filters):
        logger.addFilter(_drop_db_error_traceback)


def _drop_db_error_traceback(record: Any) -> bool:
    return not str(record.msg).startswith("SQLAlchemy database error")
