# Everything installs into .venv; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and the DALI wheel follow the NVIDIA driver nvidia-smi reports (tools/pick_wheels.py):
# R580+ CUDA 13 (nvidia-dali-cuda130), R525-R579 CUDA 12 (nvidia-dali-cuda120), no GPU the CPU
# build of torch. Choose by hand with CUDA=cpu, CUDA=12 or CUDA=13; TORCH="..." overrides torch's
# pip arguments alone.
CUDA    ?= auto
PICK    := $(PYTHON) tools/pick_wheels.py --cuda $(CUDA)
PIPQ    := --quiet --disable-pip-version-check
DEMO    ?= demo-out
WORKERS ?=

.PHONY: install lint test faults demo bench scale-check clean gpu-rehearsal
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PICK) explain
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIPQ) $(or $(TORCH),$$($(PICK) torch))
	deps="$$($(PICK) deps)" && if [ -z "$$deps" ]; then $(PY) -m pip install $(PIPQ) -e ".[test]"; \
	else $(PY) -m pip install $(PIPQ) $$deps && $(PY) -m pip install $(PIPQ) --no-deps -e .; fi
	touch $@

# ruff (pyproject.toml's [tool.ruff]; installed with the test extra): lint only, no reformatting.
lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q -rs

# The slow fault suites: crafted attacks, seeded mutation fuzz, kills (docs/RELIABILITY.md).
# `make test` runs a fast subset of each; this runs them in full.
faults: install
	$(PY) -m pytest -q -rs -m faults

# The main job on a built-in default, CPU only: draw ten classes of shapes (120 train / 30 val
# each, 96x72), convert and verify them, train AlexNet at crop 67 for 18 epochs, evaluate, plot.
# Small data needs the kaiming init and a smaller lr than ImageNet's (see README).
APP := $(VENV)/bin/alexnet-pipe
demo: install
	$(PY) tools/make_shapes.py $(DEMO)/raw --train 120 --val 30 --size 96x72 --texture 0.3
	$(APP) convert $(DEMO)/raw $(DEMO)/batches --format both --short-side 72 --no-progress
	$(APP) verify $(DEMO)/batches --no-progress
	$(APP) info $(DEMO)/batches
	$(APP) train -w $(DEMO)/batches -b cpu -e 18 --crop 67 -z 32 --lr 0.012 --lr-step 13 --init kaiming \
		-s $(DEMO)/alexnet.pt -o $(DEMO)/metrics.jsonl --serialize 5 --data-threads 1
	$(APP) test -w $(DEMO)/batches -b cpu --model-file $(DEMO)/alexnet.pt --no-progress
	$(APP) plot $(DEMO)/metrics.jsonl -o $(DEMO)/curves.png
	$(APP) inspect $(DEMO)/batches -o $(DEMO)/grid.png --crop 67 -n 16
	$(APP) inspect $(DEMO)/batches --mean -o $(DEMO)/mean.png
	@echo
	@echo "demo outputs in $(DEMO)/:"
	@echo "  raw/            the generated image set (ImageNet folder layout)"
	@echo "  batches/        LMDB + RecordIO shards, manifest.json, mean.json, mean_image.npy, mean.binaryproto"
	@echo "  alexnet.pt      trained weights; alexnet.ckpt the last checkpoint (resume with --model-file)"
	@echo "  metrics.jsonl   per-epoch metrics; curves.png their plot; grid.png one training batch; mean.png the mean image"

# Converter throughput against MXNet's im2rec.py (from its own virtualenv: MXNET_PY, see
# tools/bench_convert.py --help; without it im2rec is reported as not run) and a naive PIL loop.
bench: install
	$(PY) tools/bench_convert.py

# 1,000 classes of tiny images in hundreds of shards, every step through the CLI, with wall time and
# peak memory (tools/scale_check.py; results in benchmarks/scale-check.md). Not part of `make test`.
# SCALE_FLAGS=--small: a smoke run of about two minutes, reported in $(SCALE)/scale-check-small.md.
SCALE       ?= scale-out
SCALE_FLAGS ?=
scale-check: install
	$(PY) tools/scale_check.py --work $(SCALE) $(SCALE_FLAGS)

# tools/gpu_check.sh rehearsed on the CPU (BACKEND=cpu) in the GPU host's package set plus the offline
# DALI bundle, the project un-installed, as on the lent GPU machine (tools/gpu_rehearsal.sh). The first
# run builds a Python 3.12 venv and the bundle in .rehearsal/ and .dalibundle/ (~5 GB, minutes); then
# about 3 minutes. Not part of `make test`.
gpu-rehearsal:
	bash tools/gpu_rehearsal.sh

clean:
	rm -rf $(VENV) $(DEMO) $(SCALE) *.egg-info
