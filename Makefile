# Two newcomer commands: `make demo` and `make test`. Both create .venv and install pinned dependencies if needed.
# `make test-fast` runs the unit tier only (tests/unit: in process, minutes); `make test` runs every tier, as CI does.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_ARGS ?=

.PHONY: demo test test-fast install clean-demo

install: $(STAMP)

# setuptools' editable-install notice is silenced (it warns that ./train shadows the installed train, which is the
# point of an editable install); everything else pip or the build prints still shows.
# constraints.txt pins every package to a set that was resolved and tested together (torch 2.14.1 + torchvision
# 0.29.1: mosaicml-streaming imports torchvision, and PyPI's torchvision does not import beside a CPU-only torch).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	@echo "installing the pinned set into $(VENV) (first run only: a few minutes, ~7 GB)"
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dedistill demo --out $(DEMO_DIR) $(DEMO_ARGS)

# Three pytest-xdist workers by default, on 2 cores: much of the suite waits on process starts, SLURM jobs and fault
# timeouts. With two workers the cores were idle 17 % of the run (1796 s of CPU in 18:02); a third worker fills those
# waits (tests/conftest.py keeps the tests sharing a costly fixture on one worker, starts the slow modules first and
# gives each worker its share of the cores). `make test XDIST=` runs in one process.
XDIST ?= -n 3 --dist loadgroup

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST)

# tests/unit, and the test files not yet placed in a tier that hold the line `# tier: unit`
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit $$(grep -lx '# tier: unit' tests/test_*.py 2>/dev/null)

clean-demo:
	rm -rf $(DEMO_DIR)
