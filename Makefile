# The README's two commands: `make demo` and `make test`. Both create .venv on
# first use, so a fresh clone needs nothing else (bubblewrap aside, see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-wan bench-notebook bench-classroom bytecode clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Every kernel start imports this package; an installed wheel has its bytecode
# compiled by pip, a checkout only if Python may write it (PYTHONDONTWRITEBYTECODE
# machines never do), and compiling ~30 modules costs each start ~50 ms of CPU.
# Stale files are harmless: Python checks each against its source.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q modbox_kernel

demo: bytecode
	$(BIN)/python scripts/demo.py

test: bytecode
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check modbox_kernel tests bench
	$(BIN)/ruff format --check modbox_kernel
	$(BIN)/mypy modbox_kernel

bench: bytecode
	$(BIN)/python bench/bench_exec.py
	$(BIN)/python bench/bench_kernel.py

# A shared service behind a delay proxy at RTT 0, 40 and 100 ms: a few minutes.
bench-wan: bytecode
	$(BIN)/python bench/bench_wan.py

# A notebook through nbclient under both kernels, interleaved (under a minute).
bench-notebook: bytecode
	$(BIN)/python bench/bench_notebook.py

# 40 kernels of each kind on this host: minutes of CPU, so not part of `make bench`.
bench-classroom: bytecode
	$(BIN)/python bench/bench_classroom.py

clean:
	rm -rf $(VENV) build dist *.egg-info
