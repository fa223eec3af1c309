# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version is on disk as a CPU build; an unpinned torch pulls gigabytes of CUDA.
TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,dev,dicom,openvino]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/liverkd demo

test: $(BIN)/.installed
	$(BIN)/ruff check liverkd distill deploy tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check liverkd distill deploy tests benchmarks

# OpenVINO comes with the install above (the openvino extra); the benchmark skips it, with a message, if absent.
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/network_cpu.py

clean:
	rm -rf $(VENV) runs/demo
