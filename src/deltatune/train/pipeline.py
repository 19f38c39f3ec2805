"""What the CLI subcommands do, as plain functions: ``run_train``, ``run_eval``, ``run_generate``,
``run_merge``, ``inspect_adapter``. The CLI only parses options and prints.

``run_train`` in order: check ``--out``; load the model and tokenizer; build the data (the default
inflection task, or ``--data``); run the method's model preparer if it has one (e.g. quantization);
score the base model (metric and chitchat perplexity: the "before" column); inject the adapter
built by the method's config builder; train with evaluations; save the adapter (PEFT format) into
``--out``; perplexity with the adapter; write ``report.json``, ``metrics.jsonl`` and ``curves.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Optional

import torch

from .config import OptionError, TrainConfig

class UsageError(ValueError):
    """Bad command-line input (one-line message; the CLI exits with code 2)."""


# Every folder deltatune writes (train --out, merge --out) holds this marker, written first. Only a
# folder with the marker may be replaced with --overwrite, and then only deltatune's own entries
# are deleted (the names below and those the marker lists); anything else the user put there stays.
OUTPUT_MARKER = "deltatune-output.json"
_OWN_NAMES = {"adapter_config.json", "adapter_model.safetensors", "report.json", "metrics.jsonl", "curves.png",
              "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "vocab.json", "merges.txt", "added_tokens.json", OUTPUT_MARKER}


def _own_entry(name: str, listed: set) -> bool:
    import re

    return (name in _OWN_NAMES or name in listed or re.fullmatch(r"checkpoint-\d+", name) is not None
            or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None)


def check_out(path: str, overwrite: bool) -> str:
    """Check that ``path`` can take a new output (nothing is changed); return it absolute.

    Raises:
        UsageError: ``path`` is a file or lies under one; it exists, is not empty and ``overwrite``
            is False; or it is not empty and was not written by deltatune (no marker file, and not a
            training run of a version before the marker: ``report.json`` + ``adapter_config.json``):
            such a folder is never emptied, whatever the flags.
    """
    path = os.path.abspath(os.path.expanduser(path))
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isfile(path):
        raise UsageError(f"--out {path} is a file: give a folder")
    if parent and parent != path and not os.path.isdir(parent):
        raise UsageError(f"--out {path} lies under the file {parent}: give a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise UsageError(f"--out {path} exists and is not empty: pass --overwrite or choose another folder")
        legacy_run = all(os.path.isfile(os.path.join(path, n)) for n in ("report.json", "adapter_config.json"))
        if not os.path.isfile(os.path.join(path, OUTPUT_MARKER)) and not legacy_run:
            raise UsageError(f"--out {path} is not empty and was not written by deltatune (no {OUTPUT_MARKER}): "
                             "refusing to delete anything in it; choose another folder")
    return path


def prepare_out(path: str, overwrite: bool, command: str = "train") -> str:
    """:func:`check_out`, then create ``path`` or delete deltatune's earlier output in it, and write the marker.

    Only deltatune's own entries go (the files and ``checkpoint-N`` folders a run or merge writes,
    and whatever the marker lists); any other file stays where it is.
    """
    path = check_out(path, overwrite)
    kept: list = []
    if os.path.isdir(path) and os.listdir(path):
        try:
            with open(os.path.join(path, OUTPUT_MARKER), encoding="utf-8") as fh:
                listed = set(json.load(fh).get("files", []))
        except (OSError, ValueError, AttributeError):
            listed = set()
        for name in sorted(os.listdir(path)):
            if not _own_entry(name, listed):
                kept.append(name)  # the user's: stays, and is never listed as deltatune's
                continue
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    try:
        os.makedirs(path, exist_ok=True)
        write_marker(path, command, files=[], kept=kept)
    except OSError as e:
        raise UsageError(f"--out {path} cannot be written: {e.strerror or e}") from None
    return path


def write_marker(path: str, command: str, files: Optional[list] = None, kept: Optional[list] = None) -> None:
    """(Re)write the marker of an output folder. ``files``: the entries deltatune wrote there (default:
    all but those the marker records as the user's, ``kept``, which were there before the run)."""
    from ..formats.peft import atomic_write_bytes

    marker = os.path.join(path, OUTPUT_MARKER)
    if kept is None:
        try:
            with open(marker, encoding="utf-8") as fh:
                kept = list(json.load(fh).get("kept", []))
        except (OSError, ValueError, AttributeError):
            kept = []
    if files is None:
        files = sorted(n for n in os.listdir(path) if n != OUTPUT_MARKER and n not in kept)
    body = {"written_by": "deltatune", "command": command, "files": files, "kept": sorted(kept)}
    atomic_write_bytes(marker, (json.dumps(body, indent=1) + "\n").encode())


def _say(log: Optional[Callable], msg: str) -> None:
    if log is not None:
        log(msg)


def choose_threads(requested: Optional[int] = None) -> int:
    """Torch threads for a run: ``requested``, else torch's default, except 1 on a busy machine.

    When the 1-minute load average is at least the number of cores (other processes keep every
    core busy), multi-threaded kernels wait on descheduled threads; on the 2-core machines of the
    README one thread was measured 4-7x faster per training step there (and ~100x on tiny models).
    """
    if requested:
        return int(requested)
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    return 1 if n > 1 and load >= (os.cpu_count() or n) else n


def load_base(model_path: Optional[str], dtype: str = "float32", threads: Optional[int] = None):
    """(model, tokenizer, source) from ``--model`` (None = default SmolLM2)."""
    from ..integrations.transformers import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(choose_threads(threads))
    source = resolve_model(model_path)  # fails fast (one line) when the model is not there
    try:  # no loading bars on the terminal: the CLI prints its own lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    tok = load_tokenizer(source)
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # GGUF's de-quantisation bar (plain tqdm)
        model = load_model(source, dtype=getattr(torch, dtype))
    return model, tok, source


def base_for_adapter(adapter_dir: str, model_flag: Optional[str]) -> Optional[str]:
    """The ``--model`` to use with an adapter: the flag, else the adapter's recorded base when it exists
    on this machine, else None (the default model) when the recorded base is the default model.

    Raises:
        UsageError: the adapter folder is missing, or its base cannot be found here.
    """
    from ..integrations.transformers import DEFAULT_MODEL_NAME

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise UsageError(f"--adapter {adapter_dir} is not an adapter folder (no adapter_config.json)")
    if model_flag:
        return model_flag
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
        base = json.load(fh).get("base_model_name_or_path")
    if not base:
        return None
    if os.path.exists(base):
        return base
    if DEFAULT_MODEL_NAME.lower() in os.path.basename(str(base)).lower():
        return None
    raise UsageError(f"the adapter's base model {base} is not on this machine: pass --model PATH")


def build_method_config(cfg: TrainConfig):
    """The adapter config for ``cfg.method`` from the CLI method registry.

    Raises:
        UsageError: unknown method (the message lists the registered ones).
    """
    from .. import methods as _builtin  # noqa: F401  (registers built-in methods)
    from . import methods as cli_methods

    builder = cli_methods.METHOD_BUILDERS.get(cfg.method)
    if builder is None:
        known = ", ".join(sorted(cli_methods.METHOD_BUILDERS))
        raise UsageError(f"unknown --method {cfg.method!r}; available: {known}")
    accepted = cli_methods.METHOD_OPTIONS.get(cfg.method, ())
    unknown = [k for k in cfg.method_options if k not in accepted and k not in TrainConfig.field_names()]
    if unknown:
        raise UsageError(f"--method {cfg.method} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(accepted) or '(none)'}")
    try:
        return builder(cfg.method_opts())
    except (TypeError, ValueError) as e:
        raise UsageError(f"--method {cfg.method}: {e}") from None


def read_data(cfg: TrainConfig, log=None):
    """(train examples, held-out examples, task name): the default task, or the rows of ``--data``.

    Runs before the model is loaded, so that a bad file fails at once.
    """
    from .data import load_examples, split_examples
    from .task import build_task

    if cfg.data is None:
        task = build_task(cfg.task_train_size, cfg.eval_size, cfg.seed)
        _say(log, f"data: default task, {len(task.train)} training questions from {task.n_train_lemmas} lemmas, "
                  f"{len(task.eval)} held-out words from {task.n_eval_lemmas} held-out lemmas")
        return task.train, task.eval, "inflection (lemminflect lexicon)"
    examples = load_examples(cfg.data)
    if cfg.eval_data:
        train_ex, eval_ex = examples, load_examples(cfg.eval_data)
    else:
        train_ex, eval_ex = split_examples(examples, cfg.val_fraction, cfg.seed, max_eval=cfg.eval_size or None)
    _say(log, f"data: {cfg.data}: {len(train_ex)} training rows, {len(eval_ex)} held-out rows")
    return train_ex, eval_ex, os.path.basename(cfg.data)


def encode_data(cfg: TrainConfig, tokenizer, train_ex, log=None):
    """(encoder, encoded training items)."""
    from .data import ChatEncoder

    enc = ChatEncoder(tokenizer, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on)
    items = enc.encode_all(train_ex)
    _say(log, f"tokenised: {enc.stats.summary()}")
    if not items:
        raise UsageError("no training example has a target token left: check the data and --max-seq-len")
    return enc, items


def _check_injection(model, method_config) -> None:
    """Inject and delete the adapter once, with torch's RNG forked (the real injection later draws the
    same initial values): a config that cannot apply to this model fails here, before anything is
    written or the base model is scored. ``delete_adapter`` restores the exact base model."""
    from .. import delete_adapter, inject

    with torch.random.fork_rng(devices=[]):
        inject(model, method_config, "deltatune-check")
        delete_adapter(model, "deltatune-check")


def run_train(cfg: TrainConfig, log: Optional[Callable] = print, progress: Optional[bool] = None) -> dict:
    """Train as ``deltatune train`` does; return the report dict (also written to ``out/report.json``)."""
    return train_session(cfg, log, progress)["report"]


def train_session(cfg: TrainConfig, log: Optional[Callable] = print, progress: Optional[bool] = None) -> dict:
    """:func:`run_train`, returning ``{"report", "model", "tokenizer", "evaluator", "trainer"}`` (for tests
    and notebooks: the trained model stays in memory)."""
    from ..formats.peft import save_adapter
    from ..inject import count_parameters, get_config, inject
    from . import methods as cli_methods
    from .data import pad_id_of
    from .evaluate import Evaluator, PerplexityProbe
    from .loop import Trainer
    from .report import MetricsLog, format_table, peak_rss_bytes, plot_curves, write_report

    t_start = time.time()
    check_out(cfg.out, cfg.overwrite)  # nothing is deleted before every input has been checked
    method_config = build_method_config(cfg)  # fail on a bad method or data before loading the model
    train_ex, eval_ex, task_name = read_data(cfg, log)
    torch.manual_seed(cfg.seed)
    _say(log, "loading model ...")
    model, tok, source = load_base(cfg.model, cfg.dtype, cfg.threads)
    _say(log, f"model: {source.display} ({time.time() - t_start:.0f} s, {torch.get_num_threads()} threads)")
    enc, items = encode_data(cfg, tok, train_ex, log)
    evaluator = Evaluator(tok, eval_ex, enc, size=cfg.eval_size or None, loss_size=cfg.eval_loss_size,
                          batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens) if eval_ex else None
    extra = {}
    preparer = cli_methods.MODEL_PREPARERS.get(cfg.method)
    if preparer is not None:
        extra = dict(preparer(model, cfg.method_opts()) or {})
    _check_injection(model, method_config)  # e.g. target modules that match nothing: before --out is touched
    out = prepare_out(cfg.out, cfg.overwrite, "train")
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
    ppl_probe = PerplexityProbe(tok, cfg.ppl_size) if cfg.ppl_size else None

    _say(log, "scoring the base model ...")
    before = evaluator(model, 0) if evaluator else {}
    if before:
        metrics.write({"kind": "eval", **{k: v for k, v in before.items() if k != "samples"}})
        _say(log, f"before: {before['metric_name']} = {before['metric']:.3f}" +
             (f" (e.g. {before['samples'][0]['answer']!r} for {before['samples'][0]['prompt']!r})"
              if before.get("samples") else ""))
    ppl_before = ppl_probe(model) if ppl_probe else None

    inject(model, method_config)
    trainable, total = count_parameters(model)
    _say(log, f"method: {cfg.method}, trainable params {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)")

    t_train = time.time()

    def on_step(s):
        metrics.write({"kind": "train", "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
                       "targets": s.targets, "tokens": s.tokens, "seconds": s.seconds,
                       "tokens_per_s": s.tokens / max(s.seconds, 1e-9), "elapsed_s": time.time() - t_train})

    def on_eval(step, res):
        metrics.write({"kind": "eval", **{k: v for k, v in res.items() if k != "samples"}})
        _say(log, f"step {step}: {res['metric_name']} = {res['metric']:.3f}, eval loss {res['eval_loss']:.4f}"
             if res.get("eval_loss") is not None else f"step {step}: {res['metric_name']} = {res['metric']:.3f}")

    save_every = cfg.save_every if cfg.save_every is not None else cfg.eval_every
    last_ckpt = []

    def checkpoint(step):
        d = os.path.join(out, f"checkpoint-{step}")
        save_adapter(model, d)
        for old in last_ckpt:
            shutil.rmtree(old, ignore_errors=True)
        last_ckpt[:] = [d]

    trainer = Trainer(
        model, items, pad_id=pad_id_of(tok), lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, max_grad_norm=cfg.max_grad_norm,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, epochs=cfg.epochs, max_steps=cfg.max_steps,
        seed=cfg.seed, eval_every=cfg.eval_every, save_every=save_every or 0,
        evaluate=evaluator, on_step=on_step, on_eval=on_eval, checkpoint=checkpoint,
        progress=cfg.progress if progress is None else progress,
    )
    _say(log, f"training: {trainer.total_steps} optimizer steps of {cfg.batch_size} x {cfg.grad_accum} examples")
    trainer.fit()
    for old in last_ckpt:
        shutil.rmtree(old, ignore_errors=True)

    saved_cfg = get_config(model)
    saved_cfg.base_model_name_or_path = source.display
    if getattr(saved_cfg, "task_type", "") is None:
        saved_cfg.task_type = "CAUSAL_LM"  # so that peft's AutoPeftModelForCausalLM takes it
    save_adapter(model, out)
    ppl_after = ppl_probe(model) if ppl_probe else None
    after = trainer.evals[-1][1] if trainer.evals else {}

    report = {
        "method": cfg.method,
        "metric_name": (after or before).get("metric_name"),
        "metric_before": before.get("metric"),
        "metric_after": after.get("metric"),
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": time.time() - t_start,
        "train_tokens": trainer.train_tokens,
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "eval_examples": after.get("n") or before.get("n"),
        "steps": trainer.total_steps,
        "train_seconds": trainer.train_seconds,
        "train_tokens_per_s": trainer.train_tokens / max(trainer.train_seconds, 1e-9),
        "threads": torch.get_num_threads(),
        "final_loss": trainer.history[-1].loss if trainer.history else None,
        "task": task_name,
        "model": source.display,
        "out": out,
        "samples_after": after.get("samples"),
        "config": cfg.to_dict(),
        **extra,
        "extra_fields": sorted(extra),
    }
    write_report(os.path.join(out, "report.json"), report)
    metrics.close()
    if cfg.plot:
        try:
            plot_curves(metrics.rows, os.path.join(out, "curves.png"),
                        title=f"{cfg.method} on {task_name}")
        except Exception as e:  # a plotting failure must not lose the run
            _say(log, f"warning: curves.png not written: {e}")
    write_marker(out, "train")
    _say(log, "\n" + format_table(report))
    return {"report": report, "model": model, "tokenizer": tok, "evaluator": evaluator, "trainer": trainer}


# ----------------------------------------------------------------------------- other subcommands


def load_with_adapter(adapter: Optional[str], model_path: Optional[str], dtype: str = "float32"):
    """(model, tokenizer, source) with the adapter loaded for inference (or the bare base)."""
    from ..formats.peft import load_adapter

    base = base_for_adapter(adapter, model_path) if adapter else model_path
    model, tok, source = load_base(base, dtype)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    return model, tok, source


def run_eval(adapter: Optional[str], model_path: Optional[str], data: Optional[str], cfg: TrainConfig,
             log: Optional[Callable] = print) -> dict:
    """Metric (and eval loss) of model + adapter on ``data`` (all rows); without ``data``, on the held-out
    split that ``cfg`` describes: ``cfg.data``'s (as training split it; see :func:`run_settings`), or the
    default task's held-out words."""
    from .data import ChatEncoder, load_examples
    from .evaluate import Evaluator

    if data:
        examples = load_examples(data)
    else:
        if cfg.data and not os.path.isfile(cfg.data):
            raise UsageError(f"the adapter was trained on {cfg.data}, which is not here any more: pass --data FILE")
        examples = read_data(cfg)[1]
        if not examples:
            raise UsageError("the run had no held-out split: pass --data FILE")
        data = cfg.eval_data or (f"{cfg.data} (the run's held-out split)" if cfg.data else None)
    model, tok, source = load_with_adapter(adapter, model_path, cfg.dtype)
    enc = ChatEncoder(tok, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on)
    ev = Evaluator(tok, examples, enc, size=cfg.eval_size or None, loss_size=cfg.eval_loss_size,
                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
    res = ev(model)
    res.update({"adapter": adapter, "model": source.display, "data": data or "default task (held-out words)"})
    return res


def run_settings(adapter: Optional[str]) -> dict:
    """The data options a training run recorded in ``adapter/report.json`` (empty when there is none), so
    that ``deltatune eval --adapter DIR`` scores the same held-out examples as the run did."""
    p = os.path.join(adapter, "report.json") if adapter else ""
    if not p or not os.path.isfile(p):
        return {}
    try:
        with open(p, encoding="utf-8") as fh:
            conf = json.load(fh).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    keys = ("data", "eval_data", "val_fraction", "seed", "eval_size", "task_train_size", "max_seq_len", "train_on")
    return {k: conf[k] for k in keys if conf.get(k) is not None}


def run_generate(adapter: Optional[str], model_path: Optional[str], prompts: list[str], *,
                 max_new_tokens: int = 64, system: Optional[str] = None, batch_size: int = 16,
                 dtype: str = "float32") -> list[str]:
    """Greedy answers to chat prompts (one user turn each), stopping at end of turn."""
    from .data import ChatEncoder, end_of_turn_ids, pad_id_of
    from .evaluate import evaluation_mode, greedy_generate

    model, tok, _ = load_with_adapter(adapter, model_path, dtype)
    enc = ChatEncoder(tok)
    ids = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        if getattr(tok, "chat_template", None):
            ids.append(enc.prompt_ids(msgs))
        else:
            ids.append(list(tok(p)["input_ids"]))
    with evaluation_mode(model):
        outs = greedy_generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=end_of_turn_ids(tok),
                               pad_id=pad_id_of(tok), batch_size=batch_size)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


def run_merge(adapter: str, out: str, model_path: Optional[str] = None, *, overwrite: bool = False,
              dtype: str = "float32") -> str:
    """Merge the adapter into its base and write a plain transformers model folder (safetensors + tokenizer)."""
    from ..formats.peft import load_adapter
    from ..lifecycle import merge_and_unload

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    base = base_for_adapter(adapter, model_path)
    a, o = os.path.realpath(adapter), os.path.realpath(os.path.expanduser(out))
    if a == o or a.startswith(o + os.sep):
        raise UsageError(f"--out {out} would replace the adapter folder {adapter}: choose another folder")
    check_out(out, overwrite)  # nothing is deleted before the adapter has been loaded and merged
    model, tok, _ = load_base(base, dtype)
    load_adapter(model, adapter)
    model = merge_and_unload(model)
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model, as transformers would load it
    _drop_gguf_marks(model)
    out = prepare_out(out, overwrite, "merge")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_marker(out, "merge")
    return out


def _drop_gguf_marks(model) -> None:
    """A GGUF base is de-quantised on load, but transformers keeps its GGUF "quantizer", which refuses to
    save; the weights are plain float tensors, so drop the marks and save them as safetensors."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        if hasattr(model, "quantization_method"):
            try:
                del model.quantization_method
            except AttributeError:
                pass


def inspect_adapter(adapter: str) -> dict:
    """Method, targets, rank, parameter count and per-module update norms of an adapter folder.

    For LoRA modules the norm is ``||scale * B @ A||_F`` (the Frobenius norm of the weight update);
    for other tensors the L2 norm of the module's adapter tensors. Nothing is loaded but the two files.
    """
    import math as _m
    import re

    from ..formats.peft import PREFIX, read_adapter_tensors, read_config_json

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UsageError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    cfg = read_config_json(adapter)
    tensors = read_adapter_tensors(adapter)
    n_params = sum(t.numel() for t in tensors.values())
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    groups: dict = {}
    for k, t in tensors.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and mod.rpartition(".")[2] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            mod, _, leaf = mod.rpartition(".")
        groups.setdefault(mod, {})[leaf] = t.float()
    rows = []
    for mod in sorted(groups, key=lambda s: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]):
        g = groups[mod]
        A = g.get("lora_A", g.get("lora_embedding_A"))
        B = g.get("lora_B", g.get("lora_embedding_B"))
        if A is not None and B is not None:
            rank = A.shape[0]
            scale = (alpha / _m.sqrt(rank) if cfg.get("use_rslora") else alpha / rank) if alpha else 1.0
            if "lora_embedding_A" in g:
                delta = (B @ A)
            else:
                delta = B.reshape(B.shape[0], -1) @ A.reshape(rank, -1)
            norm = float(scale * torch.linalg.matrix_norm(delta))
            kind = "lora"
        else:
            norm = float(torch.sqrt(sum((t ** 2).sum() for t in g.values())))
            kind = ",".join(sorted(g))
        rows.append({"module": mod, "norm": norm, "tensors": kind,
                     "params": int(sum(t.numel() for t in g.values()))})
    return {
        "method": cfg.get("peft_type"),
        "targets": cfg.get("target_modules"),
        "rank": r,
        "lora_alpha": alpha,
        "base_model": cfg.get("base_model_name_or_path"),
        "parameters": n_params,
        "modules": rows,
        "config": cfg,
    }
