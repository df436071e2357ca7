"""Run each mutant that survived `mutmut run` once more, against the whole test files of its function.

mutmut runs a mutant against the tests it saw calling the mutated function. A module- or session-scoped fixture
calls the code while setting up for its first test only, so the other tests of that fixture (which check what it
built) are never chosen, and a mutant they would fail survives. This pass reruns every survivor against all the
selected tests of the files those tests are in (setup.cfg's selection: `-m "not slow"`), in mutmut's copy of the
project, and records the ones a test fails on as killed in mutmut's own results; `mutmut results` then lists them
as killed.

    python scripts/mutation_recheck.py              # every survivor; `make mutate` runs it after mutmut
    python scripts/mutation_recheck.py NAME ...     # only these mutants
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from mutation_report import function

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
TIMEOUT_S = 600
KILLED = 1  # mutmut's exit code for a mutant a test failed on


def _results() -> dict[str, tuple[Path, int | None]]:
    """mutant name -> (the mutants/**/*.py.meta file holding its result, mutmut's exit code; 0: survived)."""
    found = {}
    for meta in MUTANTS.rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            found[name] = (meta, code)
    return found


def _test_files(name: str, tests_by_function: dict[str, list[str]]) -> list[str]:
    return sorted({test.split("::", 1)[0] for test in tests_by_function.get(function(name), [])})


def _fails(name: str, files: list[str]) -> bool:
    env = {**os.environ, "MUTANT_UNDER_TEST": name, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(MUTANTS)}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-m", "not slow", *files]
    try:
        done = subprocess.run(command, cwd=MUTANTS, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False  # left as mutmut saw it
    if done.returncode not in (0, 1):
        raise SystemExit(f"pytest exited {done.returncode} on {name}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.returncode == 1


def main(names: list[str]) -> int:
    stats = json.loads((MUTANTS / "mutmut-stats.json").read_text())["tests_by_mangled_function_name"]
    results = _results()
    names = names or sorted(name for name, (_meta, code) in results.items() if code == 0)
    killed: dict[Path, list[str]] = defaultdict(list)
    clean: set[tuple[str, ...]] = set()  # test files seen passing with no mutant active
    for i, name in enumerate(names, 1):
        files = _test_files(name, stats)
        if files and tuple(files) not in clean:  # the same files must pass without a mutant, or no failure counts
            if _fails("none", files):
                raise SystemExit(f"{', '.join(files)} fail(s) without a mutant: fix that first")
            clean.add(tuple(files))
        verdict = "killed" if files and _fails(name, files) else "survived"
        print(f"[{i}/{len(names)}] {name}: {verdict} ({', '.join(files) or 'no tests'})", flush=True)
        if verdict == "killed":
            killed[results[name][0]].append(name)
    for meta, dead in killed.items():  # mutmut may have written other results meanwhile: read, update, write
        data = json.loads(meta.read_text())
        data["exit_code_by_key"].update(dict.fromkeys(dead, KILLED))
        meta.write_text(json.dumps(data, indent=4))
    print(f"{sum(map(len, killed.values()))} of {len(names)} survivors killed by their functions' test files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
