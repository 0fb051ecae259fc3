# Two environments, by necessity (see README): the core at .venv, TFF's runtime at .venv-tff. A third,
# .venv-bench (the peers the benchmark compares: pfl, Flower's simulation engine), is built by `make
# bench` only.
# The core (.venv) needs Python 3.12: jax >= 0.11 requires it. TFF 0.87 (.venv-tff) needs 3.11.
# Each is found without manual steps: python3.X on PATH if it runs (a pyenv shim may name a version
# that is not selected), else pyenv's install of it (`pyenv prefix`, or $PYENV_ROOT/versions/3.X.*,
# where this image ships them off PATH). Override with PYTHON_CORE=... / PYTHON_TFF=...
find_python = $(shell for p in python$(1) "$$(pyenv prefix $(1) 2>/dev/null)/bin/python$(1)" \
  $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(1).*/bin/python$(1); do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == ($(subst .,$(comma) ,$(1))); print(sys.executable)' \
  2>/dev/null && break; done)
comma := ,
PYTHON_CORE ?= $(call find_python,3.12)
PYTHON_TFF ?= $(call find_python,3.11)
CORE := .venv/bin/python
TFF := .venv-tff/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-quick test-bench lint fixtures bench envs clean-envs chromium

envs: .venv/.ready .venv-tff/.ready

.venv/.ready: requirements/core.txt requirements/core.lock pyproject.toml
	@test -n "$(PYTHON_CORE)" || { echo "error: .venv needs Python 3.12 (jax >= 0.11 requires it) and none" \
	  "was found (python3.12 on PATH, pyenv's 3.12): install one (pyenv install 3.12) or pass" \
	  "PYTHON_CORE=/path/to/python3.12"; exit 1; }
	rm -rf .venv
	$(PYTHON_CORE) -m venv .venv
	.venv/bin/pip install -q --disable-pip-version-check -r requirements/core.txt -c requirements/core.lock
	.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# tensorflow-federated 0.87.0 pins jaxlib==0.4.14, which was never published: install its other
# requirements (jaxlib 0.4.13 instead) and then TFF itself without dependency resolution.
.venv-tff/.ready: requirements/tff.txt requirements/tff.lock
	@test -n "$(PYTHON_TFF)" || { echo "error: .venv-tff needs Python 3.11 (TFF 0.87 requires it) and none" \
	  "was found (python3.11 on PATH, pyenv's 3.11): install one (pyenv install 3.11) or pass" \
	  "PYTHON_TFF=/path/to/python3.11"; exit 1; }
	rm -rf .venv-tff
	$(PYTHON_TFF) -m venv .venv-tff
	.venv-tff/bin/pip install -q --disable-pip-version-check -r requirements/tff.txt -c requirements/tff.lock
	.venv-tff/bin/pip install -q --disable-pip-version-check --no-deps tensorflow-federated==0.87.0
	touch $@

# tests/test_drawing.py opens every example's drawing (inspect --html) in a real browser: Debian's
# chromium, installed as root where it is missing, the way the environments are built.
chromium:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium) || { \
	  echo "error: the drawing's tests need Chromium: install Debian's chromium as root" \
	  "(apt-get install -y chromium)"; exit 1; }

# The main job on the bundled default example: export FedAvg to TFF and prove it on TFF 0.87.
demo: envs
	$(CORE) -m faxbridge demo -o build/demo

# Both test recipes run on every core (pytest-xdist; at most 4 workers, as each holds JAX, TF and
# IREE in memory). loadgroup keeps the tests of one xdist_group (the users of one batched runner
# call) on one worker. A plain `pytest tests/...` runs in one process; PYTEST_ARGS=-n0 does too.
PARALLEL := -n auto --maxprocesses=4 --dist loadgroup

# The whole suite, both environments, less the tests marked `bench` (they need .venv-bench: `make
# test-bench`). pytest's exit code 5 ("no tests ran") is a failure here.
# An exported PYTEST_ADDOPTS would silently narrow it (-k, -m, --deselect): only PYTEST_ARGS,
# given on purpose (make test PYTEST_ARGS=...), narrows a run.
test: envs chromium
	env -u PYTEST_ADDOPTS $(CORE) -m pytest $(PARALLEL) -m "not bench" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# The quick suite: everything but the slow round trips (the target: under a minute on 2 cores).
test-quick: .venv/.ready chromium
	env -u PYTEST_ADDOPTS $(CORE) -m pytest $(PARALLEL) -m "not slow and not bench" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# 500 random federated programs (tests/federated_programs.py) natively and through fb.split, each
# against its plain numpy reference (every seed, quick and slow markers alike; the runtimes stay out).
.PHONY: programs-long
programs-long: .venv/.ready
	FAXBRIDGE_PROGRAMS=500 $(CORE) -m pytest tests/test_generated_programs.py -k "test_native or test_split" $(PYTEST_ARGS)

# ruff, then mypy (configured in pyproject.toml) over faxbridge/ and converters/, and over the TFF
# runner apart: it runs in .venv-tff on Python 3.11 and shares no code with the rest.
lint: .venv/.ready
	.venv/bin/ruff check .
	.venv/bin/mypy faxbridge converters --exclude '^converters/runtimes/tff/tff_runner/'
	.venv/bin/mypy --python-version 3.11 converters/runtimes/tff/tff_runner

fixtures: envs
	$(CORE) interop_fixtures/regenerate.py

# The peers' environment (benchmarks/pfl_round.py, benchmarks/flower_round.py): pfl 0.6 pins
# dp-accounting < 0.6 and Flower's simulation engine needs Ray, neither of which .venv can hold. Python
# 3.12, as .venv. Only `make bench` and `make test-bench` build it.
.venv-bench/.ready: requirements/bench.txt requirements/bench.lock
	@test -n "$(PYTHON_CORE)" || { echo "error: .venv-bench needs Python 3.12 and none was found" \
	  "(python3.12 on PATH, pyenv's 3.12): install one (pyenv install 3.12) or pass" \
	  "PYTHON_CORE=/path/to/python3.12"; exit 1; }
	rm -rf .venv-bench
	$(PYTHON_CORE) -m venv .venv-bench
	.venv-bench/bin/pip install -q --disable-pip-version-check -r requirements/bench.txt -c requirements/bench.lock
	touch $@

# make bench [BENCH_ARGS=--quick]: every benchmark, results in benchmarks/results.{md,json}
bench: .venv/.ready .venv-bench/.ready
	$(CORE) benchmarks/run.py $(BENCH_ARGS)

# The tests marked `bench` (the peers' rounds in .venv-bench), which `make test` deselects: CI never
# builds that environment, and a skip must not read as a pass.
test-bench: .venv/.ready .venv-bench/.ready
	env -u PYTEST_ADDOPTS $(CORE) -m pytest -m bench $(PYTEST_ARGS)

clean-envs:
	rm -rf .venv .venv-tff .venv-bench
