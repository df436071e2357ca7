#!/usr/bin/env bash
# The Python that runs kdtrack's MLproject entry points: `python` (or `python3`) of the environment `mlflow run`
# activated (conda, virtualenv) or that the shell has active, when it has kdtrack's dependencies; otherwise this
# project's .venv (made by `make install`), so `.venv/bin/mlflow run . --env-manager local` works from a fresh shell.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for py in python python3; do
    # find_spec, not import: answers in milliseconds, and ./kdtrack itself would be found from the project folder
    if command -v "$py" >/dev/null 2>&1 &&
        "$py" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('mlflow') and u.find_spec('torch')))" \
            2>/dev/null; then
        exec "$py" "$@"
    fi
done
if [ -x "$here/.venv/bin/python" ]; then
    exec "$here/.venv/bin/python" "$@"
fi
echo "error: no Python with kdtrack's dependencies (mlflow, torch) on PATH and no $here/.venv —" \
     "run \`make install\` in $here, or activate the environment where kdtrack is installed" >&2
exit 2
