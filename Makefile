# Two commands do everything on a fresh machine (each installs what it needs):
#   make quickstart   the whole chain on the tiny model and the bundled sample data, on CPU
#   make test         the test suite (CPU)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ellama-installed
QS_OUT  ?= .quickstart

.PHONY: install quickstart test dryrun-70b plan-70b bench gpu-kit clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	# torch first: 2.13.0 is the local CPU wheel; any other spec pulls multi-GB CUDA builds (ENGINE_FACTS.md).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/ellama quickstart --out $(QS_OUT)

test: install
	$(BIN)/pytest -q

dryrun-70b: install
	$(BIN)/ellama pretrain --size 70b --dryrun

plan-70b: install
	$(BIN)/ellama plan --size 70b --gpus 480 --tokens 1T --tflops 343

bench: install
	$(BIN)/python benchmarks/bench_tokenize.py

# The GPU proof kit's wheels + tiny inputs into .gpu-kit/ (then on the GPU host: bash benchmarks/gpu/run.sh)
gpu-kit: install
	$(BIN)/python benchmarks/gpu/fetch_wheels.py

clean:
	rm -rf $(QS_OUT) .pytest_cache build *.egg-info
