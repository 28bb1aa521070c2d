# Everything installs into .venv; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# With an NVIDIA GPU take PyPI's CUDA build of torch; without one, the local CPU build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH   ?= $(if $(HAS_GPU),torch,torch==2.13.0)
DEMO    ?= demo-out
WORKERS ?=

.PHONY: install test demo bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q -rs

# The main job on a built-in default: draw a small image set, convert it, verify it, describe it.
demo: install
	$(PY) tools/make_shapes.py $(DEMO)/raw --train 200 --val 50
	$(VENV)/bin/alexnet-pipe convert $(DEMO)/raw $(DEMO)/batches --format both --shard-size 500
	$(VENV)/bin/alexnet-pipe verify $(DEMO)/batches
	$(VENV)/bin/alexnet-pipe info $(DEMO)/batches
	@echo "demo: raw images in $(DEMO)/raw, shards + manifest.json + mean.json in $(DEMO)/batches"

# Converter throughput against a naive PIL loop (see tools/bench_convert.py).
bench: install
	$(PY) tools/bench_convert.py

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
