"""One error hierarchy. The CLI prints `error: <what> — <how to fix>` and exits with `exit_code`."""
from __future__ import annotations


class KdtrackError(Exception):
    """An expected failure: shown as one line, no traceback."""

    exit_code = 1

    def __init__(self, what: str, fix: str = "") -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what} — {fix}" if fix else what)


class BadInput(KdtrackError):
    """The user asked for something that cannot work (exit code 2)."""

    exit_code = 2


class ConfigError(BadInput):
    """Unknown config key, wrong type, unreadable YAML."""


class DataError(BadInput):
    """A data source, manifest or split is unusable."""


class ModelError(BadInput):
    """Unknown model or a model that cannot take the input shape."""


class CheckpointError(KdtrackError):
    """A checkpoint is missing, corrupt or unsafe to load."""


class TrainingError(KdtrackError):
    """Training cannot go on (e.g. a non-finite loss)."""


class TrackingError(KdtrackError):
    """The tracking store is unreachable or a run is not what was asked for."""


class TeacherError(BadInput):
    """A teacher run id does not lead to a usable teacher (not found, wrong stage, checkpoint missing or mismatched)."""


class LeakageError(DataError):
    """A held-out split would be cached or distilled from without being allowed."""


class CacheNotFound(BadInput):
    """No finished, complete cache for this teacher checkpoint and dataset digest."""


class CacheError(KdtrackError):
    """A logit cache is corrupt, incomplete, stale or not a kdtrack cache."""


class RunNotFound(TrackingError, BadInput):
    """A run id that the tracking store does not know (exit code 2: the id is wrong, not the store)."""


class RunFinished(BadInput):
    """A FINISHED run was asked to be written to again; it never is."""


class RunDeleted(BadInput):
    """A run id names a deleted run."""
