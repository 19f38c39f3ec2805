"""Scale-out check on the default task: N processes x batch B against one process with batch N x B.

Runs ``deltatune train`` twice on the default task (SmolLM2-135M-Instruct, the inflection questions):
once as one process with ``--batch-size N*B``, once under ``torchrun --standalone --nproc-per-node N``
with ``--batch-size B`` (one after the other, never at once: they share the cores), then compares the
two adapters tensor by tensor and prints a Markdown table of the figures from each ``report.json``
(tokens/s in total and per process, peak RSS per process, wall and training time, final loss).

    python bench/distributed.py                                   # 2 x 8 vs 1 x 16, 20 steps, fp32
    python bench/distributed.py --strategy fsdp --out runs/dist-fsdp
    python bench/distributed.py --precision bf16                  # the fast path (bf16 rounding differs)

Threads: the single process gets ``--threads N`` (``--one-threads`` to change it) and each of the N
processes one thread, so both runs use the same cores. Evaluation is trimmed (``--eval-size 64 --ppl-size 0 --eval-every 0``): it does not
change the adapter. The raw result is ``RESULT {json}`` (also in OUT/result.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(cmd: list, env: dict) -> float:
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8, help="per process (the single process gets nproc x this)")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--out", default="runs/dist-bench")
    ap.add_argument("--extra", default="", help="more train flags, one string")
    ap.add_argument("--one-threads", type=int, default=None,
                    help="threads of the single process (default: nproc; 1 on a machine where other jobs hold cores)")
    a = ap.parse_args(argv)
    import torch
    from safetensors.torch import load_file

    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["train", "--max-steps", str(a.max_steps), "--precision", a.precision, "--eval-size", "64",
              "--ppl-size", "0", "--eval-every", "0", "--no-progress", "--no-plot", *a.extra.split()]
    one, many = os.path.join(a.out, "one"), os.path.join(a.out, f"n{a.nproc}")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    walls = {
        "one": run([sys.executable, "-m", "deltatune", *common, "--out", one, "--batch-size",
                    str(a.nproc * a.batch_size), "--threads", str(a.one_threads or a.nproc)], env),
        "many": run([torchrun, "--standalone", "--nproc-per-node", str(a.nproc), "-m", "deltatune", *common, "--out",
                     many, "--batch-size", str(a.batch_size), "--threads", "1", "--strategy", a.strategy], env),
    }
    x, y = load_file(os.path.join(one, "adapter_model.safetensors")), load_file(os.path.join(many, "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    diff = max(float((x[k] - y[k]).abs().max()) for k in x)
    scale = max(float(v.abs().max()) for v in x.values())
    ro, rm = (json.load(open(os.path.join(d, "report.json"))) for d in (one, many))
    loss_one = [r["loss"] for r in map(json.loads, open(os.path.join(one, "metrics.jsonl"))) if r["kind"] == "train"]
    loss_many = [r["loss"] for r in map(json.loads, open(os.path.join(many, "metrics.jsonl"))) if r["kind"] == "train"]
    result = {
        "nproc": a.nproc, "batch_per_process": a.batch_size, "steps": a.max_steps, "precision": a.precision,
        "strategy": a.strategy, "adapter_max_abs_diff": diff, "adapter_max_abs": scale,
        "loss_max_abs_diff": max(abs(p - q) for p, q in zip(loss_one, loss_many)),
        "one": {k: ro.get(k) for k in ("train_tokens_per_s", "peak_rss_bytes", "train_seconds", "wall_seconds",
                                       "rss_bytes_at_end_per_process", "param_bytes_per_process",
                                       "optimizer_state_bytes_per_process",
                                       "final_loss", "train_tokens", "packing", "shared_prefix")},
        "many": {k: rm.get(k) for k in ("train_tokens_per_s", "train_tokens_per_s_per_process",
                                        "peak_rss_bytes_per_process", "rss_bytes_at_end_per_process", "param_bytes_per_process",
                                        "optimizer_state_bytes_per_process", "train_seconds", "wall_seconds", "final_loss",
                                        "train_tokens", "packing", "shared_prefix")},
        "launch_wall_s": walls, "load_1min": os.getloadavg()[0], "torch": torch.__version__,
    }
    mib = 2 ** 20
    print(f"\n| run | tokens/s total | tokens/s per process | peak RSS per process | train s | wall s | final loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| 1 process x batch {a.nproc * a.batch_size} | {ro['train_tokens_per_s']:.0f} | {ro['train_tokens_per_s']:.0f} | "
          f"{ro['peak_rss_bytes'] / mib:,.0f} MiB | {ro['train_seconds']:.1f} | {ro['wall_seconds']:.0f} | {ro['final_loss']:.6f} |")
    per = ", ".join(f"{b / mib:,.0f}" for b in rm["peak_rss_bytes_per_process"])
    print(f"| {a.nproc} processes x batch {a.batch_size} ({a.strategy}) | {rm['train_tokens_per_s']:.0f} | "
          f"{rm['train_tokens_per_s_per_process']:.0f} | {per} MiB | {rm['train_seconds']:.1f} | {rm['wall_seconds']:.0f} | "
          f"{rm['final_loss']:.6f} |")
    for name, r in (("1 process", ro), (f"{a.nproc} processes", rm)):
        print(f"{name}: parameters held per process {[round(b / mib) for b in r['param_bytes_per_process']]} MiB, "
              f"AdamW state {[round(b / mib, 1) for b in r['optimizer_state_bytes_per_process']]} MiB, RSS at the end "
              f"{[round(b / mib) for b in r['rss_bytes_at_end_per_process']]} MiB")
    print(f"\nadapter max |diff| {diff:.3g} (max |value| {scale:.3g}); loss max |diff| {result['loss_max_abs_diff']:.3g}")
    with open(os.path.join(a.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
