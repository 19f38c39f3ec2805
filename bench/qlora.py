"""QLoRA train step: deltatune on a 4-bit NF4 base vs Hugging Face PEFT + bitsandbytes QLoRA, and vs
deltatune LoRA on the dense fp32 base; plus a per-layer comparison of the two 4-bit libraries.

``train`` (default): one configuration per fresh process (peak memory is per process), rounds in
alternating order, ratios per round, median and range over rounds:

* ``lora``        deltatune LoRA on the dense fp32 base;
* ``qlora``       deltatune QLoRA: ``quantize_base`` (bitsandbytes NF4, double quant, fp32 compute),
                  then the same LoRA;
* ``peft-qlora``  transformers ``BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp32 compute)``
                  + ``peft.prepare_model_for_kbit_training`` + ``peft.get_peft_model`` (the HF path);
* ``qlora-torchao`` (opt-in) deltatune QLoRA on torchao's NF4Tensor.

Each child: load the model, prepare it, AdamW (torch defaults, lr 1e-4) on LoRA r=16 alpha=32 on
q/k/v/o/gate/up/down, the same random batch (seed 0, labels = inputs), ``--warmup`` steps, then
``--steps`` timed steps (forward + backward + optimizer step, ``time.perf_counter``). Peak RSS is
VmHWM reset (``/proc/self/clear_refs``) after setup and a ``malloc_trim``, i.e. the steps' peak,
plus ``ru_maxrss`` of the whole process. Losses of the first steps show the same work was done.

``micro``: quantize and dequantize time of one weight at SmolLM2-135M's shapes, fp32 and bf16,
bitsandbytes vs torchao, and their reconstruction error (in this process, medians of ``--reps``).

Examples::

    python bench/qlora.py                                     # reference: SmolLM2, 4 x 256, 3 rounds
    python bench/qlora.py --model tiny --batch 2 --seq 32 --steps 2 --pairs 1   # quick check
    python bench/qlora.py --configs lora,qlora,peft-qlora,qlora-torchao --out runs/qlora.json
    python bench/qlora.py micro
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("lora", "qlora", "peft-qlora", "qlora-torchao")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ----------------------------------------------------------------------------- helpers
def _status_kb(field):
    try:
        m = re.search(rf"{field}:\s+(\d+)\s+kB", open("/proc/self/status").read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _mib(kb):
    return None if kb is None else kb / 1024


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for d in ("torch", "transformers", "peft", "bitsandbytes", "torchao", "deltatune"):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = None
    return out


def _cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _quiet():
    import logging
    import warnings

    for n in ("bitsandbytes", "torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(n).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _summ(xs):
    xs = list(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


# ----------------------------------------------------------------------------- models
def tiny_dir(cache):
    """A random tiny Llama (hidden 256, 2 layers) saved once, for quick checks."""
    path = os.path.join(cache, "tiny-llama-256")
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def smollm_dir(cache):
    """A save_pretrained() copy of SmolLM2-135M (fp32, from the GGUF): transformers' bitsandbytes
    loader quantizes while loading a checkpoint, it cannot take the GGUF path."""
    path = os.path.join(cache, "smollm2-135m-fp32")
    if not os.path.exists(os.path.join(path, "config.json")):
        from deltatune.integrations.transformers import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(None)
        model.config.quantization_config = None  # dequantized already: save as plain fp32
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def load(args, quantization_config=None):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"quantization_config": quantization_config, "device_map": "cpu"} if quantization_config else {}
    if args.model == "tiny" or quantization_config is not None or args.model_dir:
        path = args.model_dir or (tiny_dir(args.cache) if args.model == "tiny" else smollm_dir(args.cache))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    else:
        from deltatune.integrations.transformers import load_model_and_tokenizer

        model = load_model_and_tokenizer(None)[0]
    model.config.use_cache = False
    return model


def build(args):
    import torch

    info = {}
    if args.config == "peft-qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
        model = load(args, qc)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS,
                                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
        info["memory_footprint_bytes"] = model.get_memory_footprint()
    else:
        import deltatune as dt

        model = load(args)
        if args.config.startswith("qlora"):
            t0 = time.perf_counter()
            dt.quantize_base(model, backend="torchao" if args.config == "qlora-torchao" else "bitsandbytes")
            info["quantize_s"] = time.perf_counter() - t0
            info.update(dt.quant_stats(model))
        else:
            info.update(dt.quant_stats(model))
        dt.inject(model, dt.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS))
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def child(args):
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    _quiet()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = build(args)
    res = {"config": args.config, "setup_s": time.perf_counter() - t0, **info}
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    import gc

    gc.collect()
    _malloc_trim()
    res["rss_before_steps_mib"] = _mib(_status_kb("VmRSS"))
    res["peak_reset_ok"] = _reset_peak()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt_ = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        del loss
        if i >= args.warmup:
            times.append(dt_)
    res["peak_rss_steps_mib"] = _mib(_status_kb("VmHWM"))
    res["maxrss_process_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["step_s"] = _summ(times)
    res["step_s_all"] = times
    res["tokens_per_s"] = args.batch * args.seq / res["step_s"]["median"]
    res["losses"] = losses
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- parent
def run_child(args, config):
    cmd = [sys.executable, os.path.abspath(__file__), "child", "--config", config, "--model", args.model,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--r", str(args.r),
           "--alpha", str(args.alpha), "--cache", args.cache]
    if args.model_dir:
        cmd += ["--model-dir", args.model_dir]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"child {config} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def train(args):
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {CONFIGS}")
    os.makedirs(args.cache, exist_ok=True)
    _quiet()
    if "peft-qlora" in configs and args.model != "tiny" and not args.model_dir:
        smollm_dir(args.cache)  # made once, before timing anything
    if args.model == "tiny":
        tiny_dir(args.cache)
    rounds = []
    for i in range(args.pairs):
        order = configs if i % 2 == 0 else configs[::-1]
        rnd = {}
        for c in order:
            r = run_child(args, c)
            rnd[c] = r
            print(f"round {i} {c:14s} step {r['step_s']['median']:.3f}s  peak RSS {r['peak_rss_steps_mib']:.0f} MiB  "
                  f"maxrss {r['maxrss_process_mib']:.0f} MiB  losses {[round(x, 4) for x in r['losses'][:3]]}",
                  flush=True)
        rounds.append(rnd)
    ratios = {}

    def add(key, a, b, fn):
        vals = [fn(r[a], r[b]) for r in rounds if a in r and b in r]
        if vals:
            ratios[key] = _summ(vals)

    step = lambda x, y: x["step_s"]["median"] / y["step_s"]["median"]  # noqa: E731
    rss_diff = lambda x, y: y["peak_rss_steps_mib"] - x["peak_rss_steps_mib"]  # noqa: E731
    for q in ("qlora", "qlora-torchao"):
        add(f"step {q}/lora", q, "lora", step)
        add(f"step {q}/peft-qlora", q, "peft-qlora", step)
        add(f"peak RSS lora - {q} (MiB)", q, "lora", rss_diff)
        add(f"peak RSS peft-qlora - {q} (MiB)", q, "peft-qlora", rss_diff)
    per_config = {}
    for c in configs:
        rs = [r[c] for r in rounds]
        per_config[c] = {
            "step_s_median": statistics.median(r["step_s"]["median"] for r in rs),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
            "peak_rss_steps_mib_median": statistics.median(r["peak_rss_steps_mib"] for r in rs),
            "maxrss_process_mib_median": statistics.median(r["maxrss_process_mib"] for r in rs),
            "first_losses": rs[0]["losses"][:3],
            "base_weight_bytes": rs[0].get("base_weight_bytes"),
            "bytes_per_quantized_param": rs[0].get("bytes_per_quantized_param"),
            "trainable_params": rs[0].get("trainable_params"),
        }
    res = {"bench": "qlora", "argv": sys.argv, "args": vars(args), "cpu": _cpu(), "nproc": os.cpu_count(),
           "loadavg": os.getloadavg(), "versions": _versions(), "per_config": per_config, "ratios": ratios,
           "rounds": rounds}
    print("\n| config | s/step | tokens/s | peak RSS (steps) | maxrss | first losses |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c, v in per_config.items():
        print(f"| {c} | {v['step_s_median']:.3f} | {v['tokens_per_s_median']:.0f} | "
              f"{v['peak_rss_steps_mib_median']:.0f} MiB | {v['maxrss_process_mib_median']:.0f} MiB | "
              f"{', '.join(f'{x:.4f}' for x in v['first_losses'])} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: median {v['median']:.3f} [{v['min']:.3f} .. {v['max']:.3f}] over {v['n']} rounds")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("RESULT " + json.dumps({k: res[k] for k in ("per_config", "ratios", "versions", "cpu", "loadavg")}))


# ----------------------------------------------------------------------------- micro
def micro(args):
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    _quiet()
    import torch

    torch.set_num_threads(args.threads)
    from deltatune.quant.bnb import import_bnb
    from deltatune.quant.nf4 import import_nf4, scaler_block_size

    bf = import_bnb().functional
    NF4Tensor = import_nf4()

    def med(fn):
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    shapes = {"q/o_proj 576x576": (576, 576), "k/v_proj 192x576": (192, 576),
              "gate/up_proj 1536x576": (1536, 576), "down_proj 576x1536": (576, 1536)}
    rows = []
    torch.manual_seed(0)
    print("| weight (out x in) | dtype | bnb quantize ms | bnb dequantize ms | torchao quantize ms | "
          "torchao dequantize ms | rel. error bnb / torchao |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (o, i) in shapes.items():
        w32 = torch.randn(o, i) * 0.02
        for dtype in (torch.float32, torch.bfloat16):
            w = w32.to(dtype)
            data, qs = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            sbs = scaler_block_size(w.numel() // 64)
            nf = NF4Tensor.from_tensor(w, 64, sbs)
            row = {
                "shape": name, "dtype": str(dtype).replace("torch.", ""), "torchao_scaler_block": sbs,
                "bnb_quantize_ms": med(lambda: bf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                                quant_type="nf4")),
                "bnb_dequantize_ms": med(lambda: bf.dequantize_4bit(data, qs)),
                "torchao_quantize_ms": med(lambda: NF4Tensor.from_tensor(w, 64, sbs)),
                "torchao_dequantize_ms": med(lambda: nf.get_original_weight()),
                "bnb_rel_err": float((bf.dequantize_4bit(data, qs).float() - w32).norm() / w32.norm()),
                "torchao_rel_err": float((nf.get_original_weight().float() - w32).norm() / w32.norm()),
            }
            rows.append(row)
            print(f"| {name} | {row['dtype']} | {row['bnb_quantize_ms']:.2f} | {row['bnb_dequantize_ms']:.3f} | "
                  f"{row['torchao_quantize_ms']:.2f} | {row['torchao_dequantize_ms']:.3f} | "
                  f"{row['bnb_rel_err']:.4f} / {row['torchao_rel_err']:.4f} |", flush=True)
    res = {"bench": "qlora-micro", "argv": sys.argv, "threads": args.threads, "cpu": _cpu(),
           "loadavg": os.getloadavg(), "versions": _versions(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("RESULT " + json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="train", choices=["train", "child", "micro"])
    ap.add_argument("--configs", default="lora,qlora,peft-qlora", help=f"comma list from {CONFIGS}")
    ap.add_argument("--config", default="qlora", help="child mode: the one configuration to run")
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--model-dir", default=None, help="a transformers folder to use instead")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=3, help="rounds (each runs every config once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10, help="micro mode: timed repetitions")
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-cache"),
                    help="where the save_pretrained() model copies go")
    ap.add_argument("--out", default=None, help="write the full JSON here")
    args = ap.parse_args()
    {"train": train, "child": child, "micro": micro}[args.mode](args)


if __name__ == "__main__":
    main()
