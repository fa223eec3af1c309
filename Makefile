# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version is on disk as a CPU build; an unpinned torch pulls gigabytes of CUDA.
TORCH := torch==2.13.0
# Every other package too: the versions CI passed with (the pyproject ranges stay for users).
PIN := -c constraints.txt
SOURCES := liverkd distill deploy tests benchmarks

.PHONY: demo test lint format bench constraints clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIN) --upgrade pip
	$(BIN)/pip install -q $(PIN) $(TORCH)
	$(BIN)/pip install -q $(PIN) -e '.[train,dev,dicom,openvino]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/liverkd demo

test: lint
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/python tests/import_contract.py

format: $(BIN)/.installed
	$(BIN)/ruff format $(SOURCES)
	$(BIN)/ruff check --fix $(SOURCES)

# OpenVINO comes with the install above (the openvino extra); the benchmark skips it, with a message, if absent.
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/network_cpu.py

constraints: $(BIN)/.installed
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^liverkd' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; $(BIN)/pip freeze --all | grep -E '^(setuptools|pip)=='; } > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) runs/demo
