# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version is on disk as a CPU build; an unpinned torch pulls gigabytes of CUDA.
TORCH := torch==2.13.0
# Every other package too: the versions CI passed with (the pyproject ranges stay for users).
PIN := -c constraints.txt
SOURCES := liverkd distill deploy configs tests benchmarks

.PHONY: demo test test-py310 test-triton lint format bench constraints constraints-py310 constraints-triton clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIN) --upgrade pip
	$(BIN)/pip install -q $(PIN) $(TORCH)
	$(BIN)/pip install -q $(PIN) -e '.[train,plot,build,dev,dicom,openvino,fast,triton]'
	touch $@

# The suite a second time on Python 3.10 (JetPack 6's Python) with what pip resolves there and no
# torch (no CPU wheel for it here): the runtime, calibration and INT8 build must work on it.
PY310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
VENV310 := .venv310

$(VENV310)/bin/.installed: pyproject.toml constraints-py310.txt
	$(PY310) -m venv $(VENV310)
	$(VENV310)/bin/pip install -q -c constraints-py310.txt --upgrade pip
	$(VENV310)/bin/pip install -q -c constraints-py310.txt -e '.[plot,build,dev,dicom,openvino,fast]'
	touch $@

test-py310: $(VENV310)/bin/.installed
	$(VENV310)/bin/python -m pytest -q

# A real Triton Inference Server (issue 17, docs/serving.md): NVIDIA's nvidia-pytriton wheel bundles tritonserver
# with its Python backend, and needs numpy < 2, so it gets a venv of its own (pinned: constraints-triton.txt).
# Where the wheel cannot be installed (it is built for x86-64 and aarch64 Linux, glibc 2.35+), the target says
# so and passes; where the server cannot start, tests/test_triton_server.py skips with the reason.
TRITON_PYTHON ?= $(PYTHON)
VENV_TRITON := .venv-triton

$(VENV_TRITON)/bin/.installed: pyproject.toml constraints-triton.txt
	$(TRITON_PYTHON) -m venv $(VENV_TRITON)
	$(VENV_TRITON)/bin/pip install -q -c constraints-triton.txt --upgrade pip
	$(VENV_TRITON)/bin/pip install -q -c constraints-triton.txt nvidia-pytriton pytest -e '.[build,triton,fast]'
	touch $@

test-triton:
	@if $(MAKE) --no-print-directory $(VENV_TRITON)/bin/.installed; then \
	  $(VENV_TRITON)/bin/python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_server.py; \
	else echo "test-triton: skipped: nvidia-pytriton could not be installed into $(VENV_TRITON) (pip says why above)"; fi

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

constraints-py310: $(VENV310)/bin/.installed
	{ sed -n '1,2p' constraints-py310.txt; $(VENV310)/bin/pip freeze --exclude-editable | grep -v '^liverkd'; \
	  $(VENV310)/bin/pip freeze --all | grep -E '^(setuptools|pip)=='; } > constraints.tmp
	mv constraints.tmp constraints-py310.txt

constraints-triton: $(VENV_TRITON)/bin/.installed
	{ sed -n '1,2p' constraints-triton.txt; $(VENV_TRITON)/bin/pip freeze --exclude-editable | grep -v '^liverkd'; \
	  $(VENV_TRITON)/bin/pip freeze --all | grep -E '^(setuptools|pip)=='; } > constraints.tmp
	mv constraints.tmp constraints-triton.txt

clean:
	rm -rf $(VENV) $(VENV310) $(VENV_TRITON) runs/demo
