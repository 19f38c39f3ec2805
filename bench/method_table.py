"""The README's method table: every ``deltatune train --method M`` on the main job's default task.

Each method trains through the one CLI (``deltatune train``) with the same data, steps, batch and
seed (:data:`TABLE_RECIPE`: SmolLM2-135M-Instruct, 150 optimizer steps of 16 of 2,400 questions, seed 0, held-out
exact match on 320 words of held-out lemmas, chitchat perplexity before/after), each with its own
default learning rate (``deltatune train --help`` lists them); ``full`` (full fine-tuning: every weight,
a model folder instead of an adapter) runs the same way. Runs go into ``OUT/<method>``
(``--overwrite``); ``--jobs 2`` runs two at a time with one torch thread each (on 2 cores the same
throughput as one run with two threads). A method whose ``OUT/<method>/report.json`` already exists
is not run again unless ``--rerun`` is given. At the end the table is printed as Markdown, and
written to ``OUT/method_table.md`` and ``OUT/method_table.json``.

    python bench/method_table.py                                   # all 16 methods, 4-11 min each, ~1 hour on 2 cores
    python bench/method_table.py --methods lora,qlora --jobs 1     # a subset
    python bench/method_table.py --methods ia3 --max-steps 4 --eval-size 8 --ppl-size 2 --out runs/smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from deltatune.train.presets import PRESETS

ALL = list(PRESETS)  # lora ... llama-adapter, loha, lokr, vera, adalora, oft, boft, full (train.presets)
HERE = os.path.dirname(os.path.abspath(__file__))
# The table's own recipe, fixed whatever `deltatune train`'s defaults become (the demo's recipe may move on):
# 2,400 training questions, 16 a step (150 steps, one epoch), the warm-up's first step at lr 0, answers
# trained in their canonical tokens.
TABLE_RECIPE = ["--task-train-size", "2400", "--batch-size", "16", "--warmup-from-zero", "true",
                "--task-wording", "quoted-canonical"]


def deltatune_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "deltatune")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "deltatune.cli"]


def run_all(methods, args) -> None:
    pending = [m for m in methods if args.rerun or not os.path.isfile(os.path.join(args.out, m, "report.json"))]
    running: list = []
    while pending or running:
        while pending and len(running) < args.jobs:
            m = pending.pop(0)
            out = os.path.join(args.out, m)
            cmd = deltatune_cmd() + ["train", "--method", m, "--out", out, "--overwrite", "--no-progress",
                                     "--threads", str(args.threads), "--seed", str(args.seed),
                                     "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size),
                                     "--ppl-size", str(args.ppl_size), *TABLE_RECIPE]
            if args.max_steps:
                cmd += ["--max-steps", str(args.max_steps)]
            for kv in args.extra or []:
                cmd += kv.split()
            os.makedirs(args.out, exist_ok=True)
            log = open(os.path.join(args.out, f"{m}.log"), "w")
            print(f"[{time.strftime('%H:%M:%S')}] start {m}: {' '.join(cmd)}", flush=True)
            running.append((m, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
        time.sleep(2)
        for item in list(running):
            m, proc, log, t0 = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"[{time.strftime('%H:%M:%S')}] {m}: exit {proc.returncode} after {time.time() - t0:.0f} s",
                      flush=True)


def _ppl(x) -> str:
    return "-" if x is None else f"{x:.2f}"  # --ppl-size 0: not measured


def table(methods, out_root) -> tuple[str, list]:
    rows = []
    for m in methods:
        p = os.path.join(out_root, m, "report.json")
        if not os.path.isfile(p):
            continue
        r = json.load(open(p))
        rows.append({
            "method": m, "lr": r["config"]["lr"], "trainable_params": r["trainable_params"],
            "trainable_pct": 100 * r["trainable_params"] / r["total_params"],
            "metric_before": r["metric_before"], "metric_after": r["metric_after"],
            "perplexity_before": r["perplexity_before"], "perplexity_after": r["perplexity_after"],
            "train_tokens_per_s": r["train_tokens_per_s"], "wall_seconds": r["wall_seconds"],
            "peak_rss_mib": r["peak_rss_bytes"] / 2 ** 20, "steps": r["steps"],
            "base_weight_bytes": r.get("base_weight_bytes"), "threads": r.get("threads") or r["config"].get("threads"),
        })
    head = ("| method | lr | trainable params | exact match before -> after | chitchat perplexity before -> after "
            "| train tokens/s (threads) | peak RSS | wall |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    body = "".join(
        f"| `{r['method']}` | {r['lr']:g} | {r['trainable_params']:,d} ({r['trainable_pct']:.2f}%) "
        f"| {100 * r['metric_before']:.1f}% -> **{100 * r['metric_after']:.1f}%** "
        f"| {_ppl(r['perplexity_before'])} -> {_ppl(r['perplexity_after'])} | {r['train_tokens_per_s']:.0f} ({r['threads'] or '?'}) "
        f"| {r['peak_rss_mib']:,.0f} MiB | {r['wall_seconds'] / 60:.1f} min |\n" for r in rows)
    return head + body, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--methods", default=",".join(ALL), help="comma-separated (default: all registered)")
    ap.add_argument("--out", default="runs/methods", help="root folder of the runs (default runs/methods)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="optimizer steps (default: one epoch of the table's 2,400 questions: 150)")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluations during training (default 0: before/after)")
    ap.add_argument("--eval-size", type=int, default=320)
    ap.add_argument("--ppl-size", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", action="append", help="more `deltatune train` flags, e.g. --extra '--lr 2e-3'")
    ap.add_argument("--rerun", action="store_true", help="run again even where a report exists")
    ap.add_argument("--table-only", action="store_true", help="only print the table of existing runs")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.table_only:
        run_all(methods, args)
    md, rows = table(methods, args.out)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "method_table.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(args.out, "method_table.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0 if len(rows) == len(methods) else 1


if __name__ == "__main__":
    sys.exit(main())
