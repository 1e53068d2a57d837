# Every target shares one environment: the first `make <target>` on a fresh clone creates .venv
# and installs torch (pinned, CPU wheel) first, then the project with its TensorRT-RTX and torchao extras.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-sd3
SPARSITY ?= 2:4
EXTRAS ?= rtx,torch-gpu
PYTEST_ARGS ?=
ENGINE_ARGS ?=

.PHONY: setup test engine bench sheet train-tiny quality scale-fixture scale-check clean-artifacts pareto

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

engine: setup
	$(PY) -m pipeline engine --model "$(MODEL)" --sparsity "$(SPARSITY)" $(ENGINE_ARGS)

bench: setup
	$(PY) -m pipeline engine --model "$(MODEL)" --sparsity "$(SPARSITY)" --only-bench $(ENGINE_ARGS)

# Latency vs quality over sparsity (dense, 2:4, structured 0.1-0.5) x precision (fp32, int8), end to end on ONNX
# Runtime (CPU), stages reused from the artifact store: artifacts/$(MODEL)/pareto/pareto.{json,md,png}.
PARETO_ARGS ?=
pareto: setup
	$(PY) -m benchmarks.pareto --model "$(MODEL)" $(PARETO_ARGS)

sheet: setup
	$(PY) -m pipeline sheet --model "$(MODEL)" --out artifacts/$(MODEL)/digits_sheet.png

quality: setup
	$(PY) -m benchmarks.quality --model "$(MODEL)" --json artifacts/$(MODEL)/quality.json

# Re-trains an embedded model from scratch (not part of `make test`): MODEL=tiny-sd3 (the default; ~45 min on
# 2 cores) or MODEL=tiny-flux (~25 min); the family (sd3 or flux) comes from the name.
train-tiny: setup
	$(PY) scripts/train_tiny.py --family $(patsubst tiny-%,%,$(MODEL)) --out models/$(MODEL)

# Real scale on random weights (not part of `make test`): an SD3-medium-shaped pipeline (2.0B-parameter
# transformer), then every `make engine` stage on it, each measured (time, peak RSS, sizes, parity, 2:4).
# About an hour on 2 cores and 24 GiB; FAMILY=sd3.5-large for the 8B model (needs more memory).
FAMILY ?= sd3-medium
SCALE_ARGS ?=
scale-fixture: setup
	$(PY) scripts/make_scale_fixture.py --family "$(FAMILY)" --out artifacts/fixtures/$(FAMILY)

scale-check: setup
	$(PY) -m benchmarks.scale_check --family "$(FAMILY)" $(SCALE_ARGS)

clean-artifacts:
	rm -rf artifacts
