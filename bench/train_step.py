"""Training-step throughput and memory: deltatune's training path side by side with Hugging Face PEFT.

Every configuration runs in its own fresh process (peak memory is per process); rounds alternate
the order; each child loads SmolLM2-135M-Instruct, builds LoRA r=16 alpha=32 on q/k/v/o/gate/up/
down, AdamW (lr 1e-4), runs ``--warmup`` steps and times ``--steps`` whole optimizer steps
(forward + backward + step). Reported per configuration: median step time, real tokens/s (no
padding), peak RSS of the warm-up and timed steps (VmHWM reset after setup), the first steps' losses, and achieved
GFLOP/s (the step's FLOPs / time) against the machine's matmul peak measured in the same run; with
``--kernel-times`` (on for ``all``'s 4 x 256 part) one more step under torch.profiler gives the seconds
spent in matmul kernels and in SDPA: what the matmuls alone cost bounds any speed-up.

Configurations:

* ``dt``        deltatune's default training path (``deltatune train``'s Trainer): ``--precision
                auto`` (bf16 base held once, fp32 adapters, autocast), the loss from the target rows
                through the head in chunks, packed rows where the method allows, the decoder layers
                compiled as ``--torch-compile auto`` does for a run of 200+ steps (compiling happens in
                the warm-up step, whose time is reported as ``warmup_s``; not with a shared prefix,
                whose calls carry a key/value cache and run eagerly: ``compiled`` says whether
                compiled code ran);
* ``dt-fp32``   the same path in fp32 (the reference for the loss check);
* ``dt-base``   deltatune before the fast path: fp32, full logits of the kept positions, padded rows;
* ``dt-bf16`` / ``dt-head`` / ``dt-pack`` / ``dt-prefix`` / ``dt-settings`` / ``dt-compile``: ``dt-base``
                plus one lever (the ablation; packing and the shared prefix act on the main job's data only, as
                in ``deltatune train``; ``dt-settings``: the allocator, attention, SwiGLU and RMSNorm settings of
                ``deltatune.train.fastpath``; ``dt-compile``: the decoder layers compiled);
* ``peft``      ``peft.get_peft_model`` + the transformers loss (``labels=``), fp32;
* ``peft-ac``   ``peft`` under ``torch.autocast("cpu", bfloat16)`` (PEFT's best bf16 setting).

Modes::

    python bench/train_step.py                       # synthetic 4 x 256 full-text rows, dt vs peft, 3 rounds
    python bench/train_step.py --seq 1024            # 4 x 1024 (the matmul-efficiency point)
    python bench/train_step.py data                  # the main job's real data: 16 short chat examples a step
    python bench/train_step.py scaling --seqs 256,512,1024,2048,4096 --configs dt   # step time vs tokens
    python bench/train_step.py ablation              # each lever of the fast path alone (synthetic and data)
    python bench/train_step.py loss-check --steps 50 # dt vs dt-fp32 on the default task: mean |loss difference|
    python bench/train_step.py matmul                # the machine's matmul peak, fp32 and bf16
    python bench/train_step.py all --out runs/bench/train_step.json   # every figure of bench/README.md, one run
    python bench/train_step.py all --skip scaling,ablation            # the acceptance figures only (~20 min)

``--out FILE`` writes every result as JSON. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# name: (precision, loss through the head in chunks, packed rows, shared prefix run once, the fast path's
# allocator, attention, SwiGLU and RMSNorm settings (deltatune.train.fastpath.prepare_for_training), compiled
# decoder layers (deltatune train's --torch-compile auto for a run of 200+ steps; compiled in the warm-up step))
DT_CONFIGS = {"dt": ("auto", True, True, True, True, True), "dt-fp32": ("fp32", True, True, True, True, True),
              "dt-base": ("fp32", False, False, False, False, False), "dt-bf16": ("bf16", False, False, False, False, False),
              "dt-head": ("fp32", True, False, False, False, False), "dt-pack": ("fp32", False, True, False, False, False),
              "dt-prefix": ("fp32", False, False, True, False, False),
              "dt-settings": ("fp32", False, False, False, True, False),
              "dt-compile": ("fp32", False, False, False, False, True)}


def _kb(field):
    m = re.search(rf"{field}:\s+(\d+)\s+kB", open("/proc/self/status").read())
    return int(m.group(1)) if m else 0


def _quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ----------------------------------------------------------------------------- the child: one configuration


def _model(a, dtype):
    import torch

    if a.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
        return m.to(dtype), None
    from deltatune.integrations.transformers import load_model_and_tokenizer

    return load_model_and_tokenizer(None if a.model == "default" else a.model, dtype=dtype)


def _items(a, tok, vocab):
    """Encoded examples: synthetic full-text rows (every next token a target) or the default task's."""
    import torch

    if a.mode == "data":
        from deltatune.train.data import ChatEncoder
        from deltatune.train.task import build_task

        return ChatEncoder(tok).encode_all(build_task(2400, 320, 0).train)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (a.batch * (a.warmup + a.steps), a.seq), generator=g).tolist()
    return [{"input_ids": r, "labels": [-100] + r[1:]} for r in rows]


def child(a):
    _quiet()
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import deltatune as dt
    from deltatune.train.data import collate
    from deltatune.train.loop import Trainer, plan_windows
    from deltatune.train.precision import resolve_precision

    peft_side = a.config.startswith("peft")
    prec_name, head, packing, prefix, settings, compiled = DT_CONFIGS.get(a.config, ("fp32",) + (False,) * 5)
    dev = torch.device(a.device)
    prec = resolve_precision("fp32" if peft_side else prec_name, dev)
    model, tok = _model(a, prec.base_dtype)
    model.to(dev)
    model.config.use_cache = False
    items = _items(a, tok, model.config.vocab_size)
    bs = a.batch if a.mode != "data" else 16
    windows = plan_windows(len(items), bs, 1, 1, 0, a.warmup + a.steps)
    if peft_side:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ac = torch.autocast(dev.type, dtype=torch.bfloat16) if a.config == "peft-ac" else None

        def step(window):
            b = {k: v.to(dev) for k, v in collate([items[i] for i in window[0]], 0).items()}
            with ac if ac is not None else _null():
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                             use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach()), int(b["lengths"].sum())
    else:
        import deltatune.train.loss as L
        from deltatune.train.fastpath import prepare_for_training

        if settings:
            prepare_for_training(model, prec)
        dt.inject(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        trainer = Trainer(model, items, lr=1e-4, batch_size=bs, max_steps=a.warmup + a.steps, precision=prec,
                          packing=packing and a.mode == "data", shared_prefix=prefix and a.mode == "data")
        if not head:
            L._head_of = lambda m: None  # the logits path (deltatune before the head path)
        if compiled:  # as --torch-compile auto decides for a long run of this batching
            from deltatune.integrations.hf_compile import compile_layers
            from deltatune.train.fastpath import compile_choice

            compiled = compile_choice("auto", device_type=dev.type, method="lora", steps=10**6,
                                      cached_calls=prefix and a.mode == "data")[0] and compile_layers(model) > 0
        model.train()

        def step(window):
            log = trainer.train_window(window)
            return log.loss, log.tokens
    _reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, tokens, warm = [], [], [], []
    for i, w in enumerate(windows):
        t0 = time.perf_counter()
        loss, ntok = step(w)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt_ = time.perf_counter() - t0
        losses.append(loss)
        if i >= a.warmup:
            times.append(dt_)
            tokens.append(ntok)
        else:
            warm.append(dt_)
    med = statistics.median(times)
    res = {"config": a.config, "mode": a.mode, "seq": a.seq, "batch": bs, "step_s": med, "steps_s": times,
           "warmup_s": warm, "compiled": _compiled_calls() > 0,
           "tokens_per_step": statistics.median(tokens), "tok_s": statistics.median(tokens) / med,
           "peak_steps_mib": _kb("VmHWM") / 1024, "losses": losses, "precision": prec.name, "device": str(dev),
           "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
           "gflop_per_step": _flops(model, statistics.median(tokens), a) / 1e9}
    res["gflop_s"] = res["gflop_per_step"] / med
    if a.kernel_times and dev.type == "cpu":  # CPU kernels only: on CUDA the profile would time launches
        res.update(kernel_times(step, windows[-1]))  # the last batch again (past the plan: lr 0, the same work)
    print("RESULT " + json.dumps(res), flush=True)


def _compiled_calls() -> int:
    """Layer calls that ran compiled code in this process (``deltatune.integrations.hf_compile``)."""
    mod = sys.modules.get("deltatune.integrations.hf_compile")
    return mod.compiled_calls() if mod is not None else 0


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_")


def kernel_times(step, window) -> dict:
    """One more step under torch.profiler: seconds in matmul kernels (``MATMUL_OPS``, self time) and
    in SDPA's fused attention kernels, against the profiled step's own time. What the step's
    matmuls cost at this hour bounds every speed-up: no path is faster than its matmuls."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(window)
    wall = time.perf_counter() - t0
    mm = sdpa = 0.0
    for e in prof.key_averages():
        if e.key in MATMUL_OPS:
            mm += e.self_cpu_time_total / 1e6
        elif e.key.startswith("aten::_scaled_dot_product") or e.key.startswith("aten::_efficient_attention"):
            sdpa += e.self_cpu_time_total / 1e6
    return {"profiled_step_s": wall, "matmul_s": mm, "sdpa_s": sdpa}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *e):
        return False


def _reset_peak():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def _flops(model, tokens_per_step, a) -> float:
    """FLOPs of one step: 2 N T forward + 2 N T input gradients over the frozen matmul weights (N,
    embeddings excluded, the head on every predicting position), 6 N_lora T for the adapters, and
    the attention scores (4 T^2 D per layer forward, twice that backward) per sequence."""
    cfg = model.config
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    n_mm, n_train = 0, 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
            if p.requires_grad:
                n_train += p.numel()
            else:
                n_mm += p.numel()
    head = cfg.vocab_size * D
    seq = a.seq if a.mode != "data" else tokens_per_step / 16
    rows = tokens_per_step / seq
    attn = 12 * seq * seq * D * L * rows
    return 4 * (n_mm + head) * tokens_per_step + 6 * n_train * tokens_per_step + attn


# ----------------------------------------------------------------------------- the parent


def _run(a, config, **over):
    rows = over.get("rows", "data" if a.mode == "data" else "synthetic")
    args = [sys.executable, os.path.abspath(__file__), "child", "--config", config, "--rows", rows,
            "--seq", str(over.get("seq", a.seq)), "--batch", str(a.batch), "--steps", str(over.get("steps", a.steps)),
            "--warmup", str(a.warmup), "--threads", str(a.threads), "--model", a.model, "--device", a.device]
    if over.get("kernel_times", a.kernel_times):
        args.append("--kernel-times")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=os.path.join(ROOT, "src"))
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{config} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def matmul_peak(threads: int, seconds: float = 1.5, device: str = "cpu") -> dict:
    """Best GFLOP/s of torch.matmul at the model's shapes (tokens x 576 x 1536 and back), fp32 and bf16."""
    import torch

    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (4096, 576, 576), (1024, 576, 49152 // 8)):
            x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
            for _ in range(3):
                x @ w
            sync()
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 4:
                x @ w
                reps += 1
            sync()
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        out[str(dtype).replace("torch.", "")] = best
    return out


def rounds(a, configs, **over) -> dict:
    res = {c: [] for c in configs}
    for r in range(a.pairs):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            res[c].append(_run(a, c, **over))
            x = res[c][-1]
            print(f"  round {r + 1} {c:<8} {x['step_s']:.3f} s/step  {x['tok_s']:.0f} tok/s  "
                  f"{x['peak_steps_mib']:.0f} MiB  loss {x['losses'][0]:.4f}", flush=True)
    return res


def summarize(res: dict, ref: str, peak: dict) -> list:
    rows = []
    for c, rs in res.items():
        step = statistics.median(r["step_s"] for r in rs)
        rss = statistics.median(r["peak_steps_mib"] for r in rs)
        row = {"config": c, "step_s": step, "tok_s": statistics.median(r["tok_s"] for r in rs), "peak_mib": rss,
               "gflop_s": statistics.median(r["gflop_s"] for r in rs), "first_losses": rs[0]["losses"][:3]}
        # peft-ac runs an fp32 model under bf16 autocast: its matmuls are bf16 ones
        peak_key = "bfloat16" if rs[0]["precision"] == "bf16" or c == "peft-ac" else "float32"
        row["matmul_peak_share"] = row["gflop_s"] / peak[peak_key] if peak else None
        if "matmul_s" in rs[0]:  # the profiled step (kernel_times)
            for k in ("profiled_step_s", "matmul_s", "sdpa_s"):
                row[k] = statistics.median(r[k] for r in rs)
        if ref in res and c != ref:
            ratios = [b["step_s"] / x["step_s"] for x, b in zip(rs, res[ref])]
            row[f"speed_vs_{ref}"] = statistics.median(ratios)
            row[f"speed_vs_{ref}_range"] = [min(ratios), max(ratios)]
            row[f"memory_vs_{ref}"] = rss / statistics.median(r["peak_steps_mib"] for r in res[ref])
        rows.append(row)
    return rows


def print_table(rows, ref):
    print(f"\n| config | s/step | tokens/s | peak RSS MiB | GFLOP/s (share of matmul peak) | speed vs {ref} | memory vs {ref} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        sp = r.get(f"speed_vs_{ref}")
        rng = r.get(f"speed_vs_{ref}_range")
        share = f" ({100 * r['matmul_peak_share']:.0f}%)" if r.get("matmul_peak_share") else ""
        print(f"| {r['config']} | {r['step_s']:.3f} | {r['tok_s']:.0f} | {r['peak_mib']:.0f} | {r['gflop_s']:.0f}{share} | "
              + (f"{sp:.2f}x [{rng[0]:.2f}-{rng[1]:.2f}]" if sp else "1") + " | "
              + (f"{r[f'memory_vs_{ref}']:.2f}" if sp else "1") + " |")
    for r in rows:
        if "matmul_s" in r:
            print(f"  {r['config']}: a profiled step {r['profiled_step_s']:.3f} s, of it {r['matmul_s']:.3f} s in matmuls"
                  f" ({100 * r['matmul_s'] / r['profiled_step_s']:.0f}%) and {r['sdpa_s']:.3f} s in SDPA")


def loss_check(a) -> dict:
    """The default task through deltatune train's own loop: the fast path vs its fp32 padded path, same
    data, seed and steps; the mean absolute difference of the per-step losses."""
    out = {}
    for prec, packing in (("auto", "auto"), ("fp32", "off")):
        d = f"/tmp/deltatune-losscheck-{prec}"
        cmd = [os.path.join(os.path.dirname(sys.executable), "deltatune"), "train", "--out", d, "--overwrite",
               "--max-steps", str(a.steps), "--eval-every", "0", "--eval-size", "16", "--ppl-size", "0",
               "--precision", prec, "--packing", packing, "--threads", str(a.threads), "--no-plot", "--no-progress"]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
        rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        out[prec] = [r["loss"] for r in rows if r["kind"] == "train"]
    diffs = [abs(x - y) for x, y in zip(out["auto"], out["fp32"])]
    return {"steps": len(diffs), "mean_abs_diff": sum(diffs) / len(diffs), "max_abs_diff": max(diffs),
            "fast_losses": out["auto"], "fp32_losses": out["fp32"]}


def ablation_configs(mode: str) -> list:
    """``dt-base``, each lever alone, then ``dt``; packing and the shared prefix act on the real data only."""
    return (["dt-base", "dt-bf16", "dt-head", "dt-settings", "dt-compile"] + (["dt-pack", "dt-prefix"] if mode == "data" else [])
            + ["dt"])


def run_all(a, result: dict) -> None:
    """Every figure of the README's fast-path section in one run (one matmul peak for all of them):
    synthetic 4 x 256 (dt, peft, peft-ac), 4 x 1,024 (dt: the matmul-efficiency point), the main job's
    data (dt vs peft padded), the 50-step loss check, the scaling table and the ablation. Written to
    ``--out`` after each part, so a stopped run keeps what it measured."""
    def save():
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(result, fh, indent=1)

    peak = matmul_peak(a.threads, device=a.device)
    result["matmul_gflop_s"] = peak
    print(f"matmul peak here: {peak['float32']:.0f} GFLOP/s fp32, {peak['bfloat16']:.0f} GFLOP/s bf16", flush=True)
    parts = [("synthetic_256", ["dt", "peft", "peft-ac"], {"rows": "synthetic", "seq": 256, "kernel_times": True}, "peft"),
             ("synthetic_1024", ["dt"], {"rows": "synthetic", "seq": 1024}, "peft"),
             ("data", ["dt", "peft"], {"rows": "data"}, "peft")]
    for name, configs, over, ref in parts:
        print(f"{name}:", flush=True)
        res = rounds(a, configs, **over)
        result[name] = summarize(res, ref, peak)
        print_table(result[name], ref)
        save()
    steps = a.steps
    a.steps = 50
    result["loss_check"] = loss_check(a)
    a.steps = steps
    print("loss check:", json.dumps({k: v for k, v in result["loss_check"].items() if "losses" not in k}), flush=True)
    save()
    pairs = a.pairs
    a.pairs = 1
    result["scaling"] = {}
    for s in [] if "scaling" in a.skip_parts else map(int, a.seqs.split(",")):
        print(f"scaling, seq {s}:", flush=True)
        res = rounds(a, ["dt"], rows="synthetic", seq=s, steps=max(1, min(a.steps, 4096 // s + 1)))
        result["scaling"][s] = summarize(res, "peft", peak)
        print_table(result["scaling"][s], "peft")
        save()
    for mode in () if "ablation" in a.skip_parts else ("synthetic", "data"):
        res = rounds(a, ablation_configs(mode), rows=mode)
        result[f"ablation_{mode}"] = summarize(res, "dt-base", peak)
        print_table(result[f"ablation_{mode}"], "dt-base")
        save()
    a.pairs = pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="synthetic",
                    choices=["synthetic", "data", "scaling", "ablation", "loss-check", "matmul", "all", "child"])
    ap.add_argument("--config", default="dt")
    ap.add_argument("--rows", default="synthetic", choices=["synthetic", "data"], help="(child) the batches' kind")
    ap.add_argument("--configs", default=None, help="comma list (default: dt,peft,peft-ac)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seqs", default="256,512,1024,2048,4096")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default", help="default (SmolLM2), tiny (quick check), or a local folder")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernel-times", action="store_true",
                    help="one more step per child under torch.profiler: its seconds in matmuls and in SDPA "
                         "(on in `all`'s 4 x 256 part; CPU only)")
    ap.add_argument("--skip", default="", help="(all) comma list of parts to leave out: scaling, ablation")
    a = ap.parse_args()
    if a.mode == "child":
        a.mode = a.rows
        return child(a)
    info = {"cpu": platform.processor() or platform.machine(), "threads": a.threads, "python": platform.python_version()}
    try:
        import peft
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    result = {"info": info, "mode": a.mode}
    a.skip_parts = set(filter(None, (p.strip() for p in a.skip.split(","))))
    if a.skip_parts - {"scaling", "ablation"}:
        ap.error(f"--skip: unknown part(s) {', '.join(sorted(a.skip_parts - {'scaling', 'ablation'}))}; "
                 "the parts are scaling, ablation")
    if a.mode == "all":
        return run_all(a, result)
    if a.mode == "matmul":
        result["matmul_gflop_s"] = matmul_peak(a.threads, device=a.device)
    elif a.mode == "loss-check":
        result["loss_check"] = loss_check(a)
        print(json.dumps({k: v for k, v in result["loss_check"].items() if "losses" not in k}))
    else:
        peak = matmul_peak(a.threads, device=a.device)
        result["matmul_gflop_s"] = peak
        print(f"matmul peak here: {peak['float32']:.0f} GFLOP/s fp32, {peak['bfloat16']:.0f} GFLOP/s bf16")
        if a.mode == "scaling":
            configs = (a.configs or "dt").split(",")
            result["scaling"] = {}
            for s in map(int, a.seqs.split(",")):
                print(f"seq {s}:")
                res = rounds(a, configs, rows="synthetic", seq=s, steps=max(1, min(a.steps, 4096 // s + 1)))
                result["scaling"][s] = summarize(res, "peft", peak)
                print_table(result["scaling"][s], "peft")
        elif a.mode == "ablation":
            for mode in ("synthetic", "data"):
                res = rounds(a, ablation_configs(mode), rows=mode)
                result[mode] = summarize(res, "dt-base", peak)
                print_table(result[mode], "dt-base")
        else:
            configs = (a.configs or "dt,peft,peft-ac").split(",")
            res = rounds(a, configs)
            result["rows"] = summarize(res, "peft", peak)
            result["raw"] = res
            print_table(result["rows"], "peft")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
