"""Keep mutmut's results between checkouts: `mutants/` is a build folder (not in git), and a whole run takes hours on
a small machine, so `make mutate` restores the last saved results before it runs and saves them after.

    python scripts/mutation_state.py save      # mutants/**/*.py.meta + mutmut-stats.json -> tests/mutation-state.json.gz
    python scripts/mutation_state.py restore   # the reverse, into a mutants/ that has none of them yet

mutmut itself decides what the saved results are still worth: it regenerates every mutant from the current source
and keeps a result only where the mutated function's hash is unchanged; tests added since are measured again.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
STATE = ROOT / "tests" / "mutation-state.json.gz"
STATS = "mutmut-stats.json"


def save() -> int:
    files = {str(p.relative_to(MUTANTS)): json.loads(p.read_text()) for p in sorted(MUTANTS.rglob("*.py.meta"))}
    if not files:
        print(f"nothing to save: no results under {MUTANTS}", file=sys.stderr)
        return 1
    stats = MUTANTS / STATS
    state = {"meta": files, "stats": json.loads(stats.read_text()) if stats.is_file() else None}
    STATE.write_bytes(gzip.compress(json.dumps(state, sort_keys=True).encode(), mtime=0))
    print(f"saved the results of {len(files)} files to {STATE.relative_to(ROOT)}", file=sys.stderr)
    return 0


def restore() -> int:
    if not STATE.is_file():
        return 0
    if any(MUTANTS.rglob("*.py.meta")):  # a run here already has results of its own, newer than the saved ones
        return 0
    state = json.loads(gzip.decompress(STATE.read_bytes()))
    for relative, meta in state["meta"].items():
        path = MUTANTS / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=4))
    if state["stats"] is not None:
        (MUTANTS / STATS).write_text(json.dumps(state["stats"], indent=4))
    print(f"restored the results of {len(state['meta'])} files from {STATE.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    commands = {"save": save, "restore": restore}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} save|restore")
    sys.exit(commands[sys.argv[1]]())
