# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench install clean server server-stop

install: $(INSTALLED)

# torch is pinned (constraints.txt) so the install takes the 2.13.0 build, not the newest CUDA wheels.
$(INSTALLED): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The whole pipeline on digits with a teacher-labelled transfer set: teacher -> cache -> KD and no-KD students.
demo: $(INSTALLED)
	$(VENV)/bin/kdtrack pipeline --config experiments/digits_transfer.yaml --students kd,none
	$(PY) plot_experiments.py --experiment digits-transfer --out plots
	@echo "Plots are in ./plots. Runs are in ./mlflow.db, artifacts in ./mlruns; compare them with:"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db    (then open http://127.0.0.1:5000)"

test: $(INSTALLED)
	$(PY) -m pytest -q

# CPU performance suite, a few minutes: writes benchmarks/results/<date>-<host>.json and prints the table.
bench: $(INSTALLED)
	$(PY) -m benchmarks

# Team tracking on this machine: PostgreSQL + mlflow server on 127.0.0.1, state and logs in .server/ (scripts/server.sh).
server: $(INSTALLED)
	MLFLOW=$(abspath $(VENV))/bin/mlflow scripts/server.sh start

server-stop:
	scripts/server.sh stop

clean:
	rm -rf $(VENV) mlflow.db mlruns
