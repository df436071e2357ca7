"""The only module that imports mlflow: stage runs, tags, params, metrics, datasets and artifacts."""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient

from kdtrack import __version__, claims, config
from kdtrack.errors import RunNotFound, TrackingError

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


def configure() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    return MlflowClient()


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

    def log_dataset(self, *, name: str, digest: str, context: str, source: dict[str, str]) -> None:
        """Show the dataset in the run's inputs, identified by kdtrack's digest."""
        dataset = MetaDataset(
            CodeDatasetSource({**source, f"{TAG}dataset_digest": digest}),
            name=name,
            digest=digest[:MLFLOW_DIGEST_CHARS],
        )
        mlflow.log_input(dataset, context=context)


@contextlib.contextmanager
def stage_run(stage: str, cfg: Any, *, run_name: str, description: str = "",
              resume_run_id: str | None = None) -> Iterator[StageRun]:
    """Start (or resume) a run of `stage`, nested under the active run if any; it ends FINISHED, or
    FAILED/KILLED if the body raises."""
    client = configure()
    _check_reachable(client)
    nested = mlflow.active_run() is not None
    run_id = resume_run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID"))
    if run_id is None and not nested:
        _use_experiment(client, cfg.experiment)
    elif resume_run_id and not nested:  # the run's own experiment, whichever this process used before
        mlflow.set_experiment(experiment_id=get_run(resume_run_id).info.experiment_id)
    try:
        active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
    except MlflowException as exc:
        raise TrackingError(f"cannot start a run on {tracking_uri()}: {_first_line(exc)}",
                            "check the run id and MLFLOW_TRACKING_URI") from exc
    run = StageRun(active.info.run_id, client)
    try:
        tags = {f"{TAG}stage": stage, f"{TAG}code_version": code_version(), f"{TAG}version": __version__}
        if description:
            tags["mlflow.note.content"] = description
        run.set_tags(tags)
        if not resume_run_id:
            _log_config(run, cfg)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def note_reuse(stage: str, reused_run_id: str) -> None:
    """When launched by `mlflow run`, tag the launcher's run with the finished run that was reused instead."""
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher and launcher != reused_run_id and mlflow.active_run() is None:
        StageRun.of(launcher).set_tags({f"{TAG}reused_run_id": reused_run_id,
                                        "mlflow.note.content": f"Reused finished {stage} run {reused_run_id}."})


def _use_experiment(client: MlflowClient, name: str) -> None:
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    mlflow.set_experiment(experiment_id=experiment_id)


def _log_config(run: StageRun, cfg: Any) -> None:
    params = [Param(k, _param_value(v)) for k, v in config.flatten(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        run.client.log_batch(run.run_id, params=params[start:start + 100])
    run.client.log_text(run.run_id, config.to_yaml(cfg), "config.yaml")


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
    """Paths of the artifacts directly under `path` of a run."""
    return [f.path for f in configure().list_artifacts(run_id, path)]


def local_artifact_dir(run_id: str) -> Path | None:
    """The run's artifact folder when the artifact store is a local filesystem, else None."""
    repo = get_artifact_repository(get_run(run_id).info.artifact_uri)
    return Path(repo.artifact_dir) if isinstance(repo, LocalArtifactRepository) else None


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
    return sorted((r for r in runs if r.info.status in statuses), key=lambda r: -r.info.start_time)


def get_run(run_id: str) -> Any:
    """The run `run_id`; RunNotFound when the store does not know it, TrackingError when the store fails."""
    try:
        return configure().get_run(run_id)
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
    except MlflowException as exc:
        raise TrackingError(f"tracking store {tracking_uri()} is not usable: {_first_line(exc)}",
                            "start the server or fix MLFLOW_TRACKING_URI") from exc


def _param_value(value: Any) -> str:
    if isinstance(value, list):
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
