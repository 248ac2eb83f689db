# Two set-up commands: `make test` and `make demo`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is named in the same pip command as everything that depends on it, so pip never swaps in another build.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Test workers (pytest-xdist): one per core, at most 4 (each holds torch and the session's tiny models); 0: serial.
TEST_WORKERS ?= auto

.PHONY: test demo install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/flare demo

clean:
	rm -rf $(VENV) demo-out .pytest_cache
