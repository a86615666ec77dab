# Every target creates and fills .venv from requirements-lock.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test unit notebooks-test results bench clean

$(STAMP): requirements-lock.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else "$(PYTHON) is Python %d.%d, but rtrl_moe needs 3.11; run make clean, then for example make test PYTHON=python3.11" % v)'
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# All tests: the unit tests, then the stored notebook outputs through nbval.
test: venv
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval notebooks/ --nbval-sanitize-with notebooks/sanitize.cfg

unit: venv
	$(PY) -m pytest -q tests

# Every notebook and figure, headless (CUDA when available, else CPU).
results: venv
	$(PY) -m rtrl_moe.reproduce $(ARGS)

bench: venv
	$(PY) -m rtrl_moe.benchmarks $(ARGS)

clean:
	rm -rf $(VENV)
