# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
EXTRAS_VENV ?= .venv-extras
EXTRAS_PY := $(EXTRAS_VENV)/bin/python
EXTRAS_INSTALLED := $(EXTRAS_VENV)/.installed

.PHONY: demo test test-fast test-extras bench mutate mutate-report install clean server server-stop

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
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
	@echo "then open the students of the demo (grouped by method, the columns that matter chosen):"
	@$(PY) -c 'from kdtrack import tracking; print("  " + tracking.runs_view_url("digits-transfer", "kdtrack-students"))'

# Everything, the tests marked slow (servers, PostgreSQL, mlflow run, torchrun, forked faults) included; CI runs this.
# Bytecode is written (__pycache__/, ignored by git) even where PYTHONDONTWRITEBYTECODE is set: otherwise every test
# process and every child a test starts compiles kdtrack and the tests anew, some 5 s each on 2 cores.
test: $(INSTALLED)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q

# The suite less the tests marked slow, on two pytest-xdist workers (each with its own tracking store), a test
# module per worker, so that a module's fixtures are built once.
test-fast: $(INSTALLED)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -m "not slow" -n 2 --dist loadscope

# The tests marked extras (torchvision and timm models as teachers), in their own venv: .venv's CPU torch has no
# torchvision on PyPI to match it (constraints-extras.txt). The GPU is hidden: these tests are CPU tests too.
test-extras: $(EXTRAS_INSTALLED)
	CUDA_VISIBLE_DEVICES= $(EXTRAS_PY) -m pytest -q -m extras

# Constraints: constraints.txt less the packages that constraints-extras.txt pins, then those pins.
$(EXTRAS_INSTALLED): setup.cfg pyproject.toml constraints.txt constraints-extras.txt
	test -x $(EXTRAS_PY) || $(PYTHON) -m venv $(EXTRAS_VENV)
	sed -n 's/^\([^#=]*\)==.*/^\1==/p' constraints-extras.txt | grep -vif - constraints.txt \
		| cat - constraints-extras.txt > $(EXTRAS_VENV)/constraints.txt
	$(EXTRAS_PY) -m pip install --quiet -c $(EXTRAS_VENV)/constraints.txt torch torchvision timm
	$(EXTRAS_PY) -m pip install --quiet -c $(EXTRAS_VENV)/constraints.txt -e '.[test]'
	touch $@

# Mutation testing of the modules that carry the promises (setup.cfg [mutmut]); long (hours on 2 cores), not part of
# CI, resumable: it starts from the results saved in tests/mutation-state.json.gz (mutmut keeps those of unchanged
# functions), saves them again when done, and writes the survivors, with the verdicts of
# tests/mutation_verdicts.tsv, to tests/MUTATION.md. Survivors are run once more against the whole test files of
# their function (scripts/mutation_recheck.py: mutmut misses the tests that share a module fixture).
# Stopped with Ctrl-C: `make mutate-report` saves and reports.
mutate: $(INSTALLED)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,mutate]'
	$(PY) scripts/mutation_state.py restore
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2
	$(PY) scripts/mutation_recheck.py
	$(MAKE) mutate-report

mutate-report:
	$(PY) scripts/mutation_state.py save
	$(PY) scripts/mutation_report.py

# CPU performance suite, a few minutes: writes benchmarks/results/<date>-<host>.json and prints the table.
bench: $(INSTALLED)
	$(PY) -m benchmarks

# Team tracking on this machine: PostgreSQL + mlflow server on 127.0.0.1, state and logs in .server/ (scripts/server.sh).
server: $(INSTALLED)
	MLFLOW=$(abspath $(VENV))/bin/mlflow scripts/server.sh start

server-stop:
	scripts/server.sh stop

clean:
	rm -rf $(VENV) $(EXTRAS_VENV) mlflow.db mlruns mutants
