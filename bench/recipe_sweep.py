"""The default task's recipe, measured: each line of the ablation is one `deltatune train` run.

Every variant is the command line of a full run on the default task (SmolLM2-135M-Instruct, the
fixed 320 held-out words); the script runs them one after another (never two at once: they
share the cores) and prints a Markdown table: held-out exact match (and per form), chitchat
perplexity before -> after, wall time and training time, with the flags that made each line.

    python bench/recipe_sweep.py --list                      # the variants
    python bench/recipe_sweep.py --only old,quoted,lr2e-3    # some of them
    python bench/recipe_sweep.py --out runs/sweep            # all; results in runs/sweep/results.json

Run it on an otherwise idle machine: the wall times are part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name -> (what changes, flags); each line adds to the line it names first ("+" lines build on it)
OLD = ["--task-wording", "plain", "--precision", "fp32", "--packing", "off", "--shared-prefix", "off"]
VARIANTS = {
    "old": ("the recipe before this issue (plain wording, fp32, padded rows)", OLD),
    "fast": ("the fast path alone (bf16, shared prefix)", ["--task-wording", "plain"]),
    "quoted": ("+ the word quoted in the question", []),
    "warmup1": ("+ warm-up from lr/W at the first step", ["--warmup-from-zero", "false"]),
    "lr2e-3": ("+ lr 2e-3", ["--lr", "2e-3"]),
    "lr3e-3": ("+ lr 3e-3", ["--lr", "3e-3"]),
    "floor": ("+ cosine floor 10% of peak", ["--lr-floor", "0.1"]),
    "clip5": ("+ gradient clipping at 5", ["--max-grad-norm", "5"]),
    "r32": ("+ rank 32, alpha 64", ["--rank", "32", "--lora-alpha", "64"]),
    "fresh300": ("+ 300 steps of fresh questions (4,800 distinct)", ["--max-steps", "300", "--task-train-size", "4800"]),
    "repeat300": ("+ 300 steps over the same 2,400 questions (2 epochs)", ["--max-steps", "300", "--epochs", "2"]),
    "batch32": ("+ 32 questions a step (150 steps, 4,800 distinct)", ["--batch-size", "32", "--task-train-size", "4800"]),
}


def run(name: str, flags: list, out: str, extra: list) -> dict:
    d = os.path.join(out, name)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deltatune"), "train", "--out", d, "--overwrite",
           "--no-progress", "--no-plot", *flags, *extra]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        return {"name": name, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    rep = json.load(open(os.path.join(d, "report.json")))
    keys = ("metric_after", "metric_by_form", "perplexity_before", "perplexity_after", "wall_seconds",
            "train_seconds", "train_tokens_per_s", "steps", "final_loss")
    return {"name": name, "flags": flags, **{k: rep.get(k) for k in keys}}


def table(results: list) -> str:
    forms = ["past", "past_participle", "ing", "plural", "comparative", "superlative"]
    head = ("| variant | flags | held-out exact match | " + " | ".join(forms)
            + " | chitchat ppl | wall s | train s |\n|" + " --- |" * (8 + len(forms)))
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | | error: {r['error']} |" + " |" * (5 + len(forms)))
            continue
        by = r.get("metric_by_form") or {}
        rows.append(f"| {r['name']}: {VARIANTS.get(r['name'], ('',))[0]} | `{' '.join(r['flags'])}` | "
                    f"**{100 * r['metric_after']:.1f}%** | " + " | ".join(f"{100 * by[f]:.0f}%" if f in by else "-"
                                                              for f in forms)
                    + f" | {r['perplexity_before']:.1f} -> {r['perplexity_after']:.1f} | {r['wall_seconds']:.0f} | "
                    f"{r['train_seconds']:.0f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma list of variant names")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=FLAGS",
                    help="define or replace a variant, e.g. --set 'mine=--lr 2e-3 --max-steps 200'")
    ap.add_argument("--extra", default="", help="flags added to every run (e.g. '--threads 2')")
    a = ap.parse_args()
    for spec in a.set:
        name, _, flags = spec.partition("=")
        VARIANTS[name] = (flags, flags.split())
    if a.list:
        for k, (what, flags) in VARIANTS.items():
            print(f"{k:<12}{what}: {' '.join(flags)}")
        return
    names = a.only.split(",") if a.only else list(VARIANTS)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    for n in names:
        print(f"running {n}: {' '.join(VARIANTS[n][1])}", flush=True)
        results = [r for r in results if r["name"] != n] + [run(n, VARIANTS[n][1], a.out, a.extra.split())]
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)
        print(table([results[-1]]).splitlines()[-1], flush=True)
    print(table([r for r in results if r["name"] in names]))


if __name__ == "__main__":
    main()
