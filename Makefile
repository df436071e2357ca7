# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test install clean

install: $(INSTALLED)

# torch is pinned (constraints.txt) so the install takes the 2.13.0 build, not the newest CUDA wheels.
$(INSTALLED): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/kdtrack train-teacher --config experiments/digits.yaml
	@echo "Runs are in ./mlflow.db, artifacts in ./mlruns. Browse them with: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: $(INSTALLED)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) mlflow.db mlruns
