# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 resolves to the local CPU build on our machines; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint format bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[torch,dev]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m resque_airflow.demo

test: install
	-bash scripts/install-browser.sh
	-bash scripts/install-fashion-mnist.sh
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench-quick: install
	$(PY) benchmarks/throughput.py --quick
	$(PY) benchmarks/evidence.py --quick --out .resque/evidence-quick

clean:
	rm -rf $(VENV) .demo .resque .pytest_cache .ruff_cache
