"""Several adapters trained in one run against the same tasks trained one after another.

The default task's questions are split by form into ``--tasks`` data sets (past tense, past
participle, -ing form, plural, ...; ``--per-task`` questions each). Two ways to train one LoRA
adapter per task, with the same options (``--steps`` optimizer steps of ``--batch-size``
questions per task, no held-out split, no perplexity probe):

* ``joint``:      ONE process, ``deltatune train --data t0=F0 --data t1=F1 ...`` (mixed batches);
* ``sequential``: ``--tasks`` processes one after another, ``deltatune train --data Fi`` each.

Each way runs in fresh processes, ``--pairs`` rounds alternating which goes first. Reported per
round: the wall time of the joint process against the summed wall time of the sequential ones
(model loading included: the sequential way loads the base once per task), and the training
throughput (train tokens / seconds in the training loop, from the runs' report.json) of both; the
medians and ranges of the ratios over rounds. The adapters of both ways are the same up to 1e-5
(``tests/test_multitask.py``), so the same work is timed; the script checks the first round's
adapters agree too. Run it on an otherwise idle machine.

Examples::

    python bench/multitask_train.py                                  # SmolLM2-135M, 4 tasks (tens of minutes)
    python bench/multitask_train.py --model tiny --steps 4 --pairs 2 # quick check (under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def tiny_model(folder: str) -> str:
    """A random 4-layer Llama (hidden 256) and a word-level chat tokenizer (w6..w999) saved in ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{n}": n for n in range(6, 1000)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(folder)
    return folder


def task_files(folder: str, n_tasks: int, per_task: int, tiny: bool) -> dict:
    """``{name: jsonl path}``: the default task's questions split by form (tiny: random word chats)."""
    import random

    files = {}
    if tiny:
        rng = random.Random(0)
        for t in range(n_tasks):
            rows = []
            for _ in range(per_task):
                q = " ".join(f"w{rng.randint(6, 999)}" for _ in range(rng.randint(4, 16)))
                a = " ".join(f"w{(int(w[1:]) * (t + 2)) % 994 + 6}" for w in q.split()[:3])
                rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            files[f"t{t}"] = rows
    else:
        from deltatune.train.task import FORMS, build_task

        task = build_task(train_size=per_task * len(FORMS) * 2, eval_size=0, seed=0)
        for t, form in enumerate(list(FORMS)[:n_tasks]):
            rows = [{"messages": e.messages} for e in task.train if e.meta.get("form") == form][:per_task]
            files[form] = rows
    out = {}
    for name, rows in files.items():
        out[name] = os.path.join(folder, f"{name}.jsonl")
        with open(out[name], "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def run(argv: list) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deltatune.cli", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a local model folder, 'tiny', or nothing for SmolLM2-135M")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--per-task", type=int, default=400, help="training questions per task")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per task")
    ap.add_argument("--batch-size", type=int, default=16, help="questions per task per step")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", help="also write the result JSON here")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="dt-multitask-")
    tiny = args.model == "tiny"
    model = tiny_model(os.path.join(root, "model")) if tiny else args.model
    files = task_files(root, args.tasks, args.per_task, tiny)
    common = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--val-fraction", "0",
              "--ppl-size", "0", "--threads", str(args.threads), "--no-progress", "--no-plot", "--packing", "off",
              "--precision", args.precision, "--warmup-steps", "2", *(["--model", model] if model else [])]
    rounds = []
    for r in range(args.pairs):
        record = {}
        order = ["joint", "sequential"] if r % 2 == 0 else ["sequential", "joint"]
        for way in order:
            out = os.path.join(root, f"r{r}-{way}")
            if way == "joint":
                data = [a for n, f in files.items() for a in ("--data", f"{n}={f}")]
                wall = run(["train", *data, "--out", out, *common])
                rep = json.load(open(os.path.join(out, "report.json")))
                record["joint"] = {"wall_s": wall, "train_s": rep["train_seconds"], "tokens": rep["train_tokens"]}
            else:
                wall, train_s, tokens = 0.0, 0.0, 0
                for n, f in files.items():
                    wall += run(["train", "--data", f, "--out", os.path.join(out, n), *common])
                    rep = json.load(open(os.path.join(out, n, "report.json")))
                    train_s += rep["train_seconds"]
                    tokens += rep["train_tokens"]
                record["sequential"] = {"wall_s": wall, "train_s": train_s, "tokens": tokens}
        if r == 0:
            from safetensors.torch import load_file

            diff = 0.0
            for n in files:
                a = load_file(os.path.join(root, "r0-joint", n, "adapter_model.safetensors"))
                b = load_file(os.path.join(root, "r0-sequential", n, "adapter_model.safetensors"))
                diff = max(diff, max((a[k] - b[k]).abs().max().item() for k in a))
            record["adapters_max_abs_diff"] = diff
        j, s = record["joint"], record["sequential"]
        record["wall_ratio"] = s["wall_s"] / j["wall_s"]
        record["train_tokens_per_s"] = {"joint": j["tokens"] / j["train_s"], "sequential": s["tokens"] / s["train_s"]}
        record["throughput_ratio"] = record["train_tokens_per_s"]["joint"] / record["train_tokens_per_s"]["sequential"]
        rounds.append(record)
        print(f"round {r}: wall joint {j['wall_s']:.1f} s vs sequential {s['wall_s']:.1f} s "
              f"(x{record['wall_ratio']:.2f}); train tokens/s joint {record['train_tokens_per_s']['joint']:.0f} vs "
              f"sequential {record['train_tokens_per_s']['sequential']:.0f} (x{record['throughput_ratio']:.2f})")
    summary = {
        "setting": vars(args), "python": platform.python_version(), "machine": platform.machine(),
        "wall_ratio_median": statistics.median(r["wall_ratio"] for r in rounds),
        "wall_ratio_range": [min(r["wall_ratio"] for r in rounds), max(r["wall_ratio"] for r in rounds)],
        "throughput_ratio_median": statistics.median(r["throughput_ratio"] for r in rounds),
        "throughput_ratio_range": [min(r["throughput_ratio"] for r in rounds),
                                   max(r["throughput_ratio"] for r in rounds)],
        "adapters_max_abs_diff": rounds[0]["adapters_max_abs_diff"], "rounds": rounds,
    }
    print("RESULT " + json.dumps(summary))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
