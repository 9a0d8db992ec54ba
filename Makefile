# Two commands a new user (and CI) needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# MODEL=tiny runs the demo offline with a tiny random MiniCPM-V 4.6 (meaningless text, real code path).
MODEL ?=
DEMO_SET := $(if $(MODEL),--set model.name=$(MODEL),)
# The torch pins of .venv and of the CPU image (infra/Dockerfile gets them as build args).
TORCH_PIN := torch==2.14.1
TORCHVISION_PIN := torchvision==0.29.1
IMAGE ?= cpmv-batch

.PHONY: install demo test bench clean image-cpu image-gpu

install: $(STAMP)

# torch/torchvision come from the builds on this machine's disk (pip takes them from there);
# installing them before the project keeps pip from pulling a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) $(TORCHVISION_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The corpus is written once: files already there are kept (same bytes, same source ids), so a
# second `make demo` shows the resume.
demo: $(STAMP)
	$(BIN)/cpmv samples demo/corpus
	$(BIN)/cpmv run jobs/demo.yaml $(DEMO_SET)

# Two suites: the main one in .venv, then the vLLM one in its own environment (vLLM pins its own
# torch/transformers); the setup script is a no-op when .venv-vllm is up to date.
VLLM_VENV ?= .venv-vllm

# The vLLM environment comes first: the main suite's HTTP-engine tests serve a tiny model from it.
test: $(STAMP)
	bash scripts/setup_vllm_env.sh $(abspath $(VLLM_VENV))
	$(BIN)/python -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest tests/vllm -q

# Benchmarks print their figures and write JSON under bench/results/ (never asserted in tests).
# engine_occupancy runs in the vLLM environment (set up as for `make test`); see bench/README.md.
bench: $(STAMP)
	bash scripts/setup_vllm_env.sh $(abspath $(VLLM_VENV))
	CPMV_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m bench.run_all

clean:
	rm -rf demo/out demo/corpus .pytest_cache

# Container images (infra/Dockerfile): cpu for the head and preprocess workers, gpu (vLLM) for engines.
image-cpu:
	docker build -f infra/Dockerfile --target cpu --build-arg TORCH_PIN=$(TORCH_PIN) \
		--build-arg TORCHVISION_PIN=$(TORCHVISION_PIN) -t $(IMAGE):cpu .

image-gpu:
	docker build -f infra/Dockerfile --target gpu -t $(IMAGE):gpu .
