# The README's two commands: `make demo` and `make test`. Both create .venv on
# first use, so a fresh clone needs nothing else (bubblewrap aside, see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-classroom clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check modbox_kernel tests bench
	$(BIN)/ruff format --check modbox_kernel
	$(BIN)/mypy modbox_kernel

bench: $(STAMP)
	$(BIN)/python bench/bench_exec.py
	$(BIN)/python bench/bench_kernel.py

# 40 kernels of each kind on this host: minutes of CPU, so not part of `make bench`.
bench-classroom: $(STAMP)
	$(BIN)/python bench/bench_classroom.py

clean:
	rm -rf $(VENV) build dist *.egg-info
