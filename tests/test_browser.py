"""The MLflow UI in a real browser: a KD and a no-KD student compared side by side, and the students view the pipeline
saves, loaded by headless Chromium from a `mlflow server` on 127.0.0.1. Screenshots go to the test's tmp dir and, when
KDTRACK_SCREENSHOTS names a folder, there too."""
from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import DIGITS, TINY_TEACHER, cli, mlflow_server
from kdtrack import tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # starts an mlflow server and a browser, and trains a pipeline (~1 min on 2 cores)
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed; install it with: apt-get install -y chromium"),
]
# Epoch counts of their own, so no step is reused from another test's pipeline (step keys ignore the experiment).
TINY = (*TINY_TEACHER, "optim.epochs=1", "student.model.hidden=[8]", "student.optim.epochs=2",
        "data.student_labels=0.05", "experiment=browser")
# What the MLflow UI writes when a page fails: an error boundary, a failed request, an unknown run or route.
PAGE_ERROR = re.compile(r"\berror\b|went wrong|not found|failed to|does not exist", re.IGNORECASE)


def _chromium(url: str, *args: str) -> str:
    """Headless Chromium on `url`, given 20 s of page time to run its scripts; its stdout. The browser and its helpers
    run in a process group of their own, stopped whole."""
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000", *args, url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return out


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL | re.IGNORECASE)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def _load(url: str, screenshot: Path) -> str:
    """The page's visible text after its scripts ran; a screenshot of it at `screenshot` (and in KDTRACK_SCREENSHOTS)."""
    _chromium(url, f"--screenshot={screenshot}")
    assert screenshot.stat().st_size > 10_000, f"no screenshot of {url}"
    if os.environ.get("KDTRACK_SCREENSHOTS"):
        folder = Path(os.environ["KDTRACK_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, folder / screenshot.name)
    text = _visible_text(_chromium(url, "--dump-dom"))
    assert "enable JavaScript" not in text or "MLflow" in text, text[:500]
    error = PAGE_ERROR.search(text)
    assert error is None, f"{url} shows an error: ...{text[max(0, error.start() - 200):error.end() + 200]}..."
    return text


def test_compare_page_and_students_view_load(store: str, tmp_path: Path):
    code, out, err = cli("pipeline", "--config", str(DIGITS), "--students", "kd,none",
                         *[a for s in TINY for a in ("--set", s)])
    assert code == 0, err
    steps = json.loads(MlflowClient().get_run(out.strip().splitlines()[-1]).data.tags["kdtrack.steps"])
    kd, none = (MlflowClient().get_run(steps[name][0]) for name in ("student-kd", "student-none"))
    experiment = kd.info.experiment_id
    with mlflow_server(tmp_path, store) as url:
        query = urllib.parse.urlencode({"runs": json.dumps([kd.info.run_id, none.info.run_id]),
                                        "experiments": json.dumps([experiment])})
        text = _load(f"{url}/#/compare-runs?{query}", tmp_path / "compare-kd-none.png")
        assert f"Comparing 2 Runs" in text and "student-kd-t4-a0.7" in text and "student-none" in text
        # the params that tell KD from no-KD are on the page with their values (1259 rows with the transfer set)
        assert re.search(r"data\.train_rows 1259 60\b", text), text[:3000]
        assert re.search(r"data\.train_splits train,unlabeled train\b", text)
        view = tracking.runs_view_url("browser", "kdtrack-students", base=url)
        text = _load(view, tmp_path / "students-view.png")
        assert "kdtrack students" in text and "Group: kd" in text and "Group: none" in text
        assert "student-kd-t4-a0.7" in text and "student-none" in text
