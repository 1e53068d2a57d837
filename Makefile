# Every target shares one environment: the first `make <target>` on a fresh clone creates .venv
# and installs torch (pinned, CPU wheel) first, then the project with its TensorRT-RTX, torchao, serving and OpenVINO extras.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-sd3
SPARSITY ?= 2:4
EXTRAS ?= rtx,torch-gpu,serve,openvino
PYTEST_ARGS ?=
ENGINE_ARGS ?=

.PHONY: setup test engine bench sheet train-tiny quality scale-fixture scale-check sizes size-check clean-artifacts pareto gpu-check gpu-wheels serve serve-stop serve-load

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/serve-numpy1 "numpy>=1.26,<2"
	@touch $@

# Two workers: a test file stays on one worker (its module fixtures, such as a Triton server, are built once),
# except the files tests/conftest.py spreads test by test (the bad-input rows).
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder tests $(PYTEST_ARGS)

engine: setup
	$(PY) -m pipeline engine --model "$(MODEL)" --sparsity "$(SPARSITY)" $(ENGINE_ARGS)

bench: setup
	$(PY) -m pipeline engine --model "$(MODEL)" --sparsity "$(SPARSITY)" --only-bench $(ENGINE_ARGS)

# Latency vs quality vs memory over sparsity (dense, 2:4, structured 0.1-0.5) x precision (fp32, int8, int4), each
# the whole served pipeline, end to end on ONNX Runtime (CPU), stages reused from the artifact store:
# artifacts/$(MODEL)/pareto/pareto.{json,md,png}.
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

# Real sizes (seconds, no download): every hub model's whole served pipeline (transformer, text encoders, VAE
# decoder) in each precision and pruning configuration, from the published configs, and the least aggressive
# configuration within the goal's budgets: artifacts/sizes/pipeline_sizes.{json,md}.
SIZES_ARGS ?=
sizes: setup
	$(PY) -m benchmarks.pipeline_sizes $(SIZES_ARGS)

# Those sizes against real files (not part of `make test`; about 35 minutes, < 9.2 GiB, 35 GB of disk): the SD3-medium
# fixture with published-size text encoders (T5-XXL 4.76B, built without a float32 copy), its float16 files, and
# stage 2's INT8/INT4 exports at two depths extrapolated to 24 blocks/layers: artifacts/sizes/check/size_check.{json,md}.
size-check: setup
	$(PY) -m benchmarks.size_check $(SIZES_ARGS)

# The GPU check (benchmarks/gpu_check.py, at most 7.5 minutes on one GPU): on a CUDA host that has nothing but a CUDA
# build of PyTorch it runs with that host's python3 (GPU_PY; no .venv), installing diffusers and torchao from WHEELS
# when they are missing. JSON + Markdown into OUT, rewritten after every phase. DRY_RUN=1: the same program here, on
# the CPU, with tiny configs (tens of seconds).
OUT ?= artifacts/gpu-check
WHEELS ?= .whl/gpu
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
gpu-check: $(if $(DRY_RUN),setup)
	$(if $(DRY_RUN),$(PY),$(GPU_PY)) -m benchmarks.gpu_check --out "$(OUT)" --wheels "$(WHEELS)" $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

# The wheels `make gpu-check` needs on an offline CUDA host with Python $(GPU_PYTHON) on x86-64: this .venv's diffusers
# and torchao (abi3, with its SM90 kernels) and importlib_metadata, about 9 MB, into WHEELS (not committed: carry it).
GPU_PYTHON ?= 3.12
gpu-wheels: setup
	mkdir -p "$(WHEELS)"
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d "$(WHEELS)" $$($(PY) -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in ('diffusers', 'torchao', 'importlib_metadata')))")
	@du -sh "$(WHEELS)"

# Triton serving (docs/serving.md): builds what is missing, writes the repository, starts tritonserver on
# 127.0.0.1 and leaves it running (FOREGROUND=1: stays in the foreground until Ctrl-C); `make serve-stop` stops it.
SERVE_ARGS ?=
SERVE_LOAD_ARGS ?=
serve: setup
	$(PY) -m pipeline serve --model "$(MODEL)" --sparsity "$(SPARSITY)" $(if $(FOREGROUND),,--detach) $(SERVE_ARGS)

serve-stop: setup
	$(PY) -m pipeline serve --stop

# Load on the server (dense vs 2:4 vs structured 0.3, concurrency 1-8, dynamic batching off/on; a few minutes on 2 cores).
serve-load: setup
	$(PY) -m benchmarks.serve_load --model "$(MODEL)" $(SERVE_LOAD_ARGS)

clean-artifacts:
	rm -rf artifacts
