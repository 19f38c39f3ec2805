"""``deltatune train`` as plain functions: :func:`run_train` and :func:`train_session`.

A run is four named steps:

1. :func:`prepare`: check ``--out`` (nothing is written yet); build the adapter config of the
   method's preset; read the data (a bad file fails before the model loads); load the model and
   tokenizer; tokenise; run the preset's model preparer (``qlora`` quantizes the base); inject the
   adapter, once (a config that does not fit the model fails here, before ``--out`` is touched);
   then create ``--out``. ``--method full`` injects nothing (:mod:`deltatune.train.full`).
2. :func:`score_base`: the metric and the chitchat perplexity of the base model (the "before"
   column), inside :func:`deltatune.disable_adapter`, which computes exactly the base model
   (``full``: the frozen base as loaded; every weight becomes trainable after it is scored).
3. :func:`fit`: the one training loop, with evaluations and checkpoints
   (:mod:`deltatune.train.checkpoint`: every ``--save-every`` steps, after the last step, and on
   SIGINT/SIGTERM, which stop the run after the current step).
4. :func:`finish`: save the adapter (PEFT format; ``full``: the model folder) into ``--out``;
   perplexity with the adapter; write ``report.json``, ``metrics.jsonl`` and ``curves.png``; then the
   checkpoints go.

A resumed run (``--resume``: :func:`train_session` with a :class:`deltatune.train.checkpoint.Resume`)
checks in step 1 that the checkpoint is of the same configuration and data, skips step 2 (the base
scores are in the checkpoint) and continues step 3 from the checkpoint.

The other subcommands are in :mod:`deltatune.train.commands`; the rules of output folders in
:mod:`deltatune.train.outputs`. Under ``torchrun`` every process runs these steps; rank 0 alone
logs and writes, the model is wrapped for ``--strategy`` after injection, and the figures are
global (:mod:`deltatune.train.distributed`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..formats.peft import save_adapter
from ..inject import count_parameters, get_config, inject
from ..lifecycle import disable_adapter
from ..integrations.hf_compile import compile_failed, compile_layers, compiled_calls, uncompile_layers
from ..integrations.transformers import ModelSource, load_model, load_tokenizer, resolve_model
from .checkpoint import Checkpointer, Resume, check_resumable, fingerprint, run_fit
from .config import TrainConfig, UsageError, absolute_paths
from . import distributed
from .data import ChatEncoder, examples_from_rows, load_examples, pad_id_of, split_examples, write_rows_jsonl
from .evaluate import Evaluator, PerplexityProbe
from .full import check_out_is_not_model, make_trainable, save_model_folder, weights_dtype
from .loop import StepLog, Trainer, TrainingInterrupted
from .packing import batching_agrees, pack, share_prefix
from .fastpath import compile_choice, malloc_setting, prepare_for_training
from .precision import Precision, resolve_device, resolve_precision
from .outputs import (TRAIN_FILES, adopt_files, check_out, prepare_out, record_files, refuse_foreign_files,
                      staging_dir, write_marker)
from .presets import PRESETS, Preset
from .report import MetricsLog, counted, format_table, peak_rss_bytes, plot_curves, write_report
from .task import build_task
from .tensorboard import metric_sinks


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


def load_base(model_path: Optional[str], dtype: str = "float32", threads: Optional[int] = None,
              device: Optional[torch.device] = None):
    """(model, tokenizer, source) from ``--model`` (None = default SmolLM2), on ``device`` (default CPU)."""
    torch.set_num_threads(choose_threads(threads))
    source = resolve_model(model_path)  # fails fast (one line) when the model is not there
    try:  # no loading bars on the terminal: the CLI prints its own lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    tok = load_tokenizer(source)
    with contextlib.redirect_stderr(io.StringIO()):  # GGUF's de-quantisation bar (plain tqdm)
        model = load_model(source, dtype=getattr(torch, dtype))
    if device is not None and device.type != "cpu":
        model.to(device)
    return model, tok, source


def run_precision(cfg: TrainConfig) -> tuple[Precision, str]:
    """(the run's :class:`Precision`, the dtype name its base weights are loaded in).

    Raises:
        UsageError: an unknown or unavailable device, or a precision the device lacks.
    """
    try:
        precision = resolve_precision(cfg.precision, resolve_device(cfg.device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return precision, cfg.dtype or str(precision.base_dtype).replace("torch.", "")


def method_preset(method: str) -> Preset:
    """The preset of ``--method``.

    Raises:
        UsageError: unknown method (the message lists the registered ones).
    """
    preset = PRESETS.get(method)
    if preset is None:
        raise UsageError(f"unknown --method {method!r}; available: {', '.join(sorted(PRESETS))}")
    return preset


def build_method_config(cfg: TrainConfig):
    """The adapter config that ``cfg.method``'s preset builds from ``cfg``.

    Raises:
        UsageError: unknown method, a ``--method-opt`` the method does not read, or a value its
            builder refuses.
    """
    preset = method_preset(cfg.method)
    unknown = [k for k in cfg.method_options if k not in preset.options]
    if unknown:
        raise UsageError(f"--method {cfg.method} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(preset.options) or '(none)'}")
    try:
        return preset.build(cfg, dict(cfg.method_options))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--method {cfg.method}: {e}") from None


@dataclass
class MemoryData:
    """Training rows held in memory (``deltatune.train(data=[...])``): ``train`` and, optionally,
    ``eval`` (the held-out rows; None: split off ``train`` as from a file)."""

    train: list
    eval: Optional[list] = None


SMALL_HELD_OUT = 10  # a held-out split with fewer rows than this gets a warning
MEMORY_DATA = ("data.jsonl", "eval_data.jsonl")  # where rows held in memory are written in --out


def read_data(cfg: TrainConfig, log=None, rows: Optional[MemoryData] = None):
    """(train examples, held-out examples, task name): the default task, the rows of ``--data``, or
    ``rows`` held in memory.

    Runs before the model is loaded, so that a bad file fails at once. A held-out split made from the
    data with fewer than :data:`SMALL_HELD_OUT` rows gets a one-line warning.
    """
    if rows is not None:
        examples = examples_from_rows(rows.train, "data")
        if rows.eval is not None:
            train_ex, eval_ex = examples, examples_from_rows(rows.eval, "eval_data")
        elif cfg.eval_data:
            train_ex, eval_ex = examples, load_examples(cfg.eval_data)
        else:
            train_ex, eval_ex = split_examples(examples, cfg.val_fraction, cfg.seed, max_eval=cfg.eval_size or None)
        _say(log, f"data: {counted(len(examples), 'row')} from memory: {counted(len(train_ex), 'training row')}, "
                  f"{counted(len(eval_ex), 'held-out row')}")
        _warn_small_held_out(log, eval_ex, rows.eval is None and not cfg.eval_data)
        return train_ex, eval_ex, "rows from memory"
    if cfg.data is None:
        task = build_task(cfg.task_train_size, cfg.eval_size, cfg.seed, wording=cfg.task_wording)
        _say(log, f"data: default task, {len(task.train)} training questions from {task.n_train_lemmas} lemmas, "
                  f"{len(task.eval)} held-out words from {task.n_eval_lemmas} held-out lemmas")
        return task.train, task.eval, "inflection (lemminflect lexicon)"
    examples = load_examples(cfg.data)
    if cfg.eval_data:
        train_ex, eval_ex = examples, load_examples(cfg.eval_data)
    else:
        train_ex, eval_ex = split_examples(examples, cfg.val_fraction, cfg.seed, max_eval=cfg.eval_size or None)
    _say(log, f"data: {cfg.data}: {counted(len(train_ex), 'training row')}, {counted(len(eval_ex), 'held-out row')}")
    _warn_small_held_out(log, eval_ex, not cfg.eval_data)
    return train_ex, eval_ex, os.path.basename(cfg.data)


def _warn_small_held_out(log, eval_ex: list, split_made: bool) -> None:
    if split_made and 0 < len(eval_ex) < SMALL_HELD_OUT:
        _say(log, f"warning: the held-out split has only {counted(len(eval_ex), 'row')}, so its scores are coarse (one row = "
                  f"{100 / len(eval_ex):.0f}%): give held-out rows of your own with --eval-data FILE (or a larger "
                  "--val-fraction)")


def encode_data(cfg: TrainConfig, tokenizer, train_ex, log=None):
    """(encoder, encoded training items)."""
    enc = ChatEncoder(tokenizer, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on, truncation=cfg.truncation)
    items = enc.encode_all(train_ex)
    _say(log, f"tokenised: {enc.stats.summary()}")
    for w in enc.stats.warnings():
        _say(log, f"warning: {w}")
    if not items:
        raise UsageError("no training example has a target token left: check the data and --max-seq-len")
    return enc, items


@dataclass
class Run:
    """What the steps of one training run share (made by :func:`prepare`)."""

    cfg: TrainConfig
    log: Optional[Callable]
    t_start: float
    model: nn.Module  # the adapter is injected
    tok: object
    source: ModelSource
    items: list  # encoded training examples
    task_name: str
    evaluator: Optional[Evaluator]
    extra: dict  # report fields of the preset's model preparer
    trainable: int
    total: int
    out: str
    metrics: MetricsLog
    ppl_probe: Optional[PerplexityProbe]
    precision: Precision
    data_stats: Optional[dict] = None  # the training set's EncodeStats.to_dict()
    trains_base: bool = False  # --method full: no adapter, every weight trains, a model folder is saved
    fingerprint: dict = field(default_factory=dict)  # what a checkpoint of this run must match to resume it
    resume: Optional[Resume] = None  # the checkpoint the run continues from
    scores_before: tuple = ({}, None)  # (evaluation, perplexity) of the base model
    dist: distributed.Dist = field(default_factory=lambda: distributed.SINGLE)  # this process's place (torchrun)
    compiled: bool = False  # the decoder layers train compiled (--torch-compile, train.fastpath.compile_choice)


def run_train(cfg: TrainConfig, log: Optional[Callable] = print, progress: Optional[bool] = None,
              resume: Optional[Resume] = None) -> dict:
    """Train as ``deltatune train`` does; return the report dict (also written to ``out/report.json``)."""
    return train_session(cfg, log, progress, resume)["report"]


def train_session(cfg: TrainConfig, log: Optional[Callable] = print, progress: Optional[bool] = None,
                  resume: Optional[Resume] = None, *, rows: Optional[MemoryData] = None) -> dict:
    """:func:`run_train`, returning ``{"report", "model", "tokenizer", "evaluator", "trainer"}`` (for tests
    and notebooks: the trained model stays in memory). ``resume``: continue that run (see
    :func:`deltatune.train.checkpoint.find_resume`). ``rows``: training data held in memory instead of
    ``cfg.data`` (see :func:`prepare`)."""
    d = start_processes(cfg)
    with distributed.lost_contact(d, "training"):
        run = prepare(cfg, log, resume, rows=rows, dist=d)
        if run.resume is not None and run.resume.state is not None:
            run.scores_before = (run.resume.run.get("before") or {}, run.resume.run.get("ppl_before"))
        else:
            try:
                run.scores_before = score_base(run)
            except KeyboardInterrupt:  # --out exists: the run can be started again from it
                raise TrainingInterrupted(0, "deltatune: interrupted before the first step; start it again with: "
                                          f"deltatune train --resume {run.out}") from None
        before, ppl_before = run.scores_before
        trainer = fit(run, progress)
        report = finish(run, trainer, before, ppl_before)
    d.close()
    return {"report": report, "model": run.model, "tokenizer": run.tok, "evaluator": run.evaluator,
            "trainer": trainer}


def start_processes(cfg: TrainConfig) -> distributed.Dist:
    """This process's :class:`~deltatune.train.distributed.Dist` for ``cfg.strategy`` and ``cfg.device``
    (joins the launcher's process group under torchrun; a single process otherwise).

    Raises:
        UsageError: an unknown device, or ``--strategy`` that this launch cannot run.
    """
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return distributed.setup(cfg.strategy, device)


def prepare(cfg: TrainConfig, log: Optional[Callable] = print, resume: Optional[Resume] = None, *,
            rows: Optional[MemoryData] = None, dist: Optional[distributed.Dist] = None) -> Run:
    """Check every input, load and prepare the model, inject the adapter once, then create ``--out``
    (a resumed run: check the checkpoint fits, then clear what the interrupted process left after it).

    ``rows`` (data held in memory) are written into ``--out`` as ``data.jsonl`` (and ``eval_data.jsonl``)
    and ``cfg.data`` (``cfg.eval_data``) name those files, so that the report records them and
    ``deltatune eval --adapter OUT`` scores the same held-out rows."""
    t_start = time.time()
    d = dist or start_processes(cfg)
    log = log if d.is_main else None  # rank 0 speaks for the run
    resolve_model(cfg.model)  # a model that is not there fails before the data is read (a hub id: with its hint)
    cfg = absolute_paths(cfg)  # recorded so, they hold from any working directory
    will_write = TRAIN_FILES + (MEMORY_DATA if rows is not None else ())
    if resume is None:  # nothing is deleted before every input has been checked (rank 0 checks, for all)
        d.first_on_main(lambda: check_out(cfg.out, cfg.overwrite, TRAIN_FILES))
        if rows is not None:  # the rows are written there: never over a file of the user's
            d.first_on_main(lambda: refuse_foreign_files(cfg.out, MEMORY_DATA))
    preset = method_preset(cfg.method)
    method_config = build_method_config(cfg)  # fail on a bad method or data before loading the model
    if not preset.trains_base and getattr(method_config, "is_prompt_learning", False):
        for flag in ("packing", "shared_prefix"):  # auto: off (see batching); on: refused before anything is touched
            if getattr(cfg, flag) == "on":
                opt = f"--{flag.replace('_', '-')}"
                raise UsageError(f"{opt} on does not work with --method {cfg.method}: its virtual tokens go in front "
                                 f"of each sequence; use {opt} off (or auto)")
    if preset.trains_base:
        check_out_is_not_model(cfg.out, cfg.model)
        cfg.dtype = weights_dtype(cfg)  # float32 master weights; --precision is the compute dtype
    train_ex, eval_ex, task_name = read_data(cfg, log, rows)
    precision, dtype = run_precision(cfg)
    if precision.device.type == "cpu":
        malloc_setting()  # a bad DELTATUNE_MALLOC fails here, before the model loads
    if cfg.torch_compile == "on":  # no compiler, or several processes: refused before the model loads
        compile_choice("on", device_type=precision.device.type, method=cfg.method, steps=0, world=d.world)
    precision = distributed.localize(d, precision)  # cuda: this process's GPU
    torch.manual_seed(cfg.seed)  # the adapter's initial values below draw from it
    _say(log, "loading model ...")
    # fsdp: loaded on the CPU, each process then keeps its shards on its device (Dist.wrap)
    model, tok, source = load_base(cfg.model, dtype, cfg.threads, None if d.lockstep else precision.device)
    prepare_for_training(model, precision)  # the fast path's allocator, attention and SwiGLU settings
    _say(log, f"model: {source.display} ({time.time() - t_start:.0f} s, {precision.device.type}, {precision.name}, "
              f"{counted(torch.get_num_threads(), 'thread')})")
    enc, items = encode_data(cfg, tok, train_ex, log)
    data_stats = enc.stats.to_dict()  # before the evaluator encodes its examples with the same encoder
    evaluator = Evaluator(tok, eval_ex, enc, size=cfg.eval_size or None, loss_size=cfg.eval_loss_size,
                          batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                          precision=precision) if eval_ex else None
    extra = dict(preset.prepare(model, dict(cfg.method_options)) or {}) if preset.prepare else {}
    if not preset.trains_base:
        inject(model, method_config)  # e.g. target modules that match nothing fail here: before --out is touched
    trainable, total = count_parameters(model)
    trainable = total if preset.trains_base else trainable  # full: every weight, once the base is scored
    _say(log, f"method: {cfg.method}, trainable params {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)")
    if d.lockstep:
        distributed.check_fsdp(model, cfg.method, precision.name, preset.trains_base, d.world)
    d.wrap(model)  # fsdp: every transformer block and the root sharded
    d.broadcast_params(p for p in model.parameters() if p.requires_grad)  # ddp: rank 0's adapter everywhere
    if d.active:
        _say(log, f"processes: {d.world} ({d.strategy}, {d.backend}); batch {cfg.batch_size} per process, "
                  f"{cfg.batch_size * d.world} combined")
    fp = fingerprint(cfg, precision=precision.name, dtype=dtype, items=items, eval_examples=eval_ex, model=model)
    fp["batch_size"] = cfg.batch_size * d.world  # the combined batch decides the arithmetic, not the split
    metrics = distributed.NoMetrics()  # (rank 0 alone writes)
    if resume is not None and resume.state is not None:
        check_resumable(resume, fp, (cfg.packing, cfg.shared_prefix))  # before anything in --out changes
        out = resume.out
        if d.is_main:
            metrics = MetricsLog(os.path.join(resume.out, "metrics.jsonl"),
                                 keep_lines=int(resume.run.get("metrics_lines", 0)))
        t_start -= float(resume.run.get("elapsed", 0.0))
        _say(log, f"resuming from {resume.checkpoint}")
    else:
        if resume is not None:
            _say(log, f"no complete checkpoint in {resume.out}: the run starts again from step 0")
        out = d.first_on_main(lambda: prepare_out(cfg.out, cfg.overwrite or resume is not None, "train", will_write,
                                                  config=cfg.to_dict()))
        if d.is_main:
            metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
        if rows is not None:
            cfg.data = os.path.join(out, MEMORY_DATA[0])
            if d.is_main:
                write_rows_jsonl(cfg.data, rows.train)
            if rows.eval is not None:
                cfg.eval_data = os.path.join(out, MEMORY_DATA[1])
                if d.is_main:
                    write_rows_jsonl(cfg.eval_data, rows.eval)
    if d.is_main:
        sinks = metric_sinks(cfg.report_to, out)
        record_files(out, add=[os.path.basename(s.path) for s in sinks if getattr(s, "path", None)])
        metrics.sinks = sinks
    return Run(cfg=cfg, log=log, t_start=t_start, model=model, tok=tok, source=source, items=items,
               task_name=task_name, evaluator=evaluator, extra=extra, trainable=trainable, total=total, out=out,
               metrics=metrics, precision=precision, data_stats=data_stats, trains_base=preset.trains_base,
               fingerprint=fp, resume=resume, dist=d,
               ppl_probe=PerplexityProbe(tok, cfg.ppl_size, precision=precision) if cfg.ppl_size else None)


def score_base(run: Run) -> tuple[dict, Optional[float]]:
    """(evaluation, chitchat perplexity) of the base model: the adapter is disabled meanwhile.

    Evaluations fork torch's RNG (:func:`deltatune.train.evaluate.evaluation_mode`), so scoring draws
    nothing from the stream training uses.
    """
    _say(run.log, "scoring the base model ...")
    main = run.dist.main_call  # rank 0 scores (every process when the model is sharded)
    with contextlib.nullcontext() if run.trains_base else disable_adapter(run.model):  # exactly the base model
        before = main(run.evaluator)(run.model, 0) if run.evaluator else {}
        if before:
            run.metrics.write({"kind": "eval", **{k: v for k, v in before.items() if k != "samples"}})
            _say(run.log, f"before: {before['metric_name']} = {before['metric']:.3f}" +
                 (f" (e.g. {before['samples'][0]['answer']!r} for {before['samples'][0]['prompt']!r})"
                  if before.get("samples") else ""))
        ppl_before = main(run.ppl_probe)(run.model) if run.ppl_probe else None
    return before, ppl_before


def fit(run: Run, progress: Optional[bool] = None) -> Trainer:
    """Train with evaluations; checkpoints go into ``out/checkpoint-N`` (the last ``--keep-checkpoints``
    are kept until :func:`finish`); a resumed run continues from its checkpoint."""
    cfg, model, log = run.cfg, run.model, run.log
    t_train = time.time()

    def on_step(s):
        run.metrics.write({"kind": "train", "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
                           "targets": s.targets, "tokens": s.tokens, "seconds": s.seconds,
                           "tokens_per_s": s.tokens / max(s.seconds, 1e-9), "elapsed_s": time.time() - t_train})

    def on_eval(step, res):
        run.metrics.write({"kind": "eval", **{k: v for k, v in res.items() if k != "samples"}})
        _say(log, f"step {step}: {res['metric_name']} = {res['metric']:.3f}, eval loss {res['eval_loss']:.4f}"
             if res.get("eval_loss") is not None else f"step {step}: {res['metric_name']} = {res['metric']:.3f}")

    save_every = cfg.save_every if cfg.save_every is not None else cfg.eval_every
    if run.trains_base:
        make_trainable(model)  # the base has been scored: now every weight trains
    resumed = run.resume if run.resume is not None and run.resume.state is not None else None
    packing, shared = tuple(resumed.run["batching"]) if resumed else batching(run)
    saver = Checkpointer(run.out, model, keep=cfg.keep_checkpoints, meta=lambda: {
        "config": cfg.to_dict(), "fingerprint": run.fingerprint, "batching": [packing, shared],
        "before": {k: v for k, v in run.scores_before[0].items()}, "ppl_before": run.scores_before[1],
        "metrics_lines": run.metrics.sync(), "elapsed": time.time() - run.t_start},
        save_weights=(lambda m, folder: save_model_folder(m, run.tok, folder)) if run.trains_base else None)
    if run.dist.active:  # every process gathers, rank 0 writes
        saver = distributed.SharedSaver(run.dist, model, saver if run.dist.is_main else None)
    trainer = Trainer(
        model, run.items, pad_id=pad_id_of(run.tok), lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, max_grad_norm=cfg.max_grad_norm,
        lr_floor=cfg.lr_floor, warmup_from_zero=cfg.warmup_from_zero,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, epochs=cfg.epochs, max_steps=cfg.max_steps,
        seed=cfg.seed, eval_every=cfg.eval_every, save_every=save_every or 0,
        evaluate=run.dist.main_call(run.evaluator), on_step=on_step, on_eval=on_eval,
        checkpoint=lambda step: saver.save(trainer),
        progress=cfg.progress if progress is None else progress, precision=run.precision, packing=packing,
        shared_prefix=shared, dist=run.dist,
    )
    if resumed:
        trainer.load_state_dict(resumed.state)
        trainer.history = history_of(run.metrics.rows)
    compiled, why = compile_choice(cfg.torch_compile, device_type=run.precision.device.type, method=cfg.method,
                                   steps=trainer.total_steps - trainer.step, world=run.dist.world,
                                   cached_calls=shared)
    run.compiled = compiled and compile_layers(model) > 0
    if run.compiled:
        _say(log, "note: the first training step compiles the decoder layers (torch.compile: 30-60 s on 2 cores, less "
                  "once its cache holds them; counted in the run's time); --torch-compile off skips it")
        if shared:
            _say(log, "note: calls that carry the shared prefix's key/value cache run eagerly (on data whose examples "
                      "share a system prompt, most of them); --shared-prefix off compiles every call")
    elif why == "no compiler for this device":
        _say(log, "note: decoder layers not compiled: no C++ compiler found for torch.compile (install g++ or clang++ "
                  "for faster long runs)")
    how = ", ".join(["packed rows" if packing else "padded rows"] + (["shared prefix"] if shared else [])
                    + (["compiled layers"] if run.compiled else []))
    _say(log, f"training: {trainer.total_steps} optimizer steps of {cfg.batch_size} x {cfg.grad_accum} examples"
              + (f" x {run.dist.world} processes" if run.dist.active else "")
              + f" ({how}, {run.precision.name})" + (f", from step {trainer.step}" if resumed else ""))
    _say(log, epochs_note(trainer.plan, len(run.items), cfg.max_steps, cfg.epochs))
    try:
        run_fit(trainer, saver, final=bool(save_every))
    finally:
        if run.compiled:  # the model handed back (and any copy of it) carries no compiled code
            uncompile_layers(model)
            run.compiled = compiled_calls() > 0 and compile_failed() is None  # what the report says: compiled code ran
    return trainer


def history_of(rows: list) -> list:
    """The :class:`StepLog` of the ``train`` rows of ``metrics.jsonl`` (a resumed run's earlier steps)."""
    keys = ("step", "loss", "lr", "grad_norm", "targets", "tokens", "seconds")
    return [StepLog(**{k: r.get(k) for k in keys}) for r in rows if r.get("kind") == "train"]


def epochs_note(plan: list, n_items: int, max_steps: Optional[int], epochs_opt: int = 1) -> str:
    """One line: how many passes over the training examples the plan makes (``plan``: the trainer's
    windows of micro-batch index lists), e.g. what ``--max-steps`` implies on a small data set."""
    seen = sum(len(mb) for window in plan for mb in window)
    epochs = seen / max(1, n_items)
    why = f"--max-steps {max_steps}" if max_steps is not None else f"--epochs {epochs_opt}"
    line = (f"{why}: {len(plan)} steps see {seen:,d} examples = {epochs:.3g} epoch{'' if epochs == 1 else 's'} of the "
            f"{n_items:,d} training examples")
    if epochs >= 5:
        line += " (each example many times: watch the held-out loss for memorisation)"
    return line


def batching(run: Run) -> tuple[bool, bool]:
    """(packing, shared prefix) for the run (:mod:`deltatune.train.packing`): each ``on``, or ``auto``
    where the method acts per token (not prompt methods, whose ``on`` :func:`prepare` refuses) and
    the model gives such a batch of a few training examples the loss of the padded one (checked here).
    """
    prompt = not run.trains_base and get_config(run.model).is_prompt_learning
    chosen = []
    for flag, name, make in (("packing", "packed rows", lambda its: pack(its, pad_id_of(run.tok))),
                             ("shared_prefix", "a shared prefix", lambda its: share_prefix(its, pad_id_of(run.tok)))):
        mode = getattr(run.cfg, flag)
        if flag == "shared_prefix" and run.dist.lockstep and mode != "off":
            _say(run.log, "note: --strategy fsdp runs without the shared prefix (a second model call on some processes "
                          "only would unpair the sharded model's all-gathers)")
            mode = "off"
        if mode == "off" or prompt:
            chosen.append(False)
            continue
        ok = mode == "on" or batching_agrees(run.model, run.items[:16], pad_id_of(run.tok), run.precision, make)
        if not ok:
            _say(run.log, f"note: on this model {name} did not reproduce the padded rows' loss (checked on the first "
                          f"training examples), so this run trains without; --{flag.replace('_', '-')} on forces it")
        chosen.append(ok)
    chosen = run.dist.broadcast_object(chosen)  # every process batches as rank 0 decided
    return chosen[0], chosen[1]


def finish(run: Run, trainer: Trainer, before: dict, ppl_before: Optional[float]) -> dict:
    """Save the adapter (``full``: the model folder), score the chitchat perplexity with it, write the report
    files; return the report."""
    cfg, model, out, d = run.cfg, run.model, run.out, run.dist
    if not run.trains_base:
        saved_cfg = get_config(model)
        saved_cfg.base_model_name_or_path = run.source.display
        if getattr(saved_cfg, "task_type", "") is None:
            saved_cfg.task_type = "CAUSAL_LM"  # so that peft's AutoPeftModelForCausalLM takes it
    with d.full_parameters(model):  # fsdp: the whole adapter tensors, gathered by every process
        if d.is_main and run.trains_base:  # rank 0 alone writes
            stage = staging_dir(out, "model")
            try:
                save_model_folder(model, run.tok, stage)
                adopt_files(out, stage)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        elif d.is_main:
            written = save_adapter(model, out)
            record_files(out, add=[os.path.relpath(x, out) for x in written if os.path.abspath(x) != out])
    ppl_after = d.main_call(run.ppl_probe)(model) if run.ppl_probe else None
    report = build_report(run, trainer, before, ppl_before, ppl_after)
    report.update(processes=d.world, strategy=d.strategy, **distributed.process_figures(d, model, trainer.optimizer),
                  train_tokens_per_s_per_process=report["train_tokens_per_s"] / d.world)  # memory held: per process
    if not d.is_main:
        return report
    write_report(os.path.join(out, "report.json"), report)
    run.metrics.close()
    if cfg.plot:
        try:
            plot_curves(run.metrics.rows, os.path.join(out, "curves.png"), title=f"{cfg.method} on {run.task_name}")
        except Exception as e:  # a plotting failure must not lose the run
            _say(run.log, f"warning: curves.png not written: {e}")
    write_marker(out, "train", status="finished")
    Checkpointer(out, model, meta=dict).remove_all()  # the run is whole: its checkpoints go
    _say(run.log, "\n" + format_table(report))
    return report


def build_report(run: Run, trainer: Trainer, before: dict, ppl_before: Optional[float],
                 ppl_after: Optional[float]) -> dict:
    """The content of ``report.json`` (the fields of :data:`deltatune.train.report.REPORT_FIELDS` and more)."""
    after = trainer.evals[-1][1] if trainer.evals else {}
    return {
        "method": run.cfg.method,
        "metric_name": (after or before).get("metric_name"),
        "metric_before": before.get("metric"),
        "metric_after": after.get("metric"),
        "metric_by_form": after.get("metric_by_form"),
        "metric_by_form_before": before.get("metric_by_form"),
        "trainable_params": run.trainable,
        "total_params": run.total,
        "peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": time.time() - run.t_start,
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
        "device": str(run.precision.device),
        "precision": run.precision.name,
        "packing": trainer.packing,
        "shared_prefix": trainer.shared_prefix,
        "torch_compile": run.compiled,
        "attention": getattr(getattr(run.model, "config", None), "_attn_implementation", None),
        "final_loss": trainer.history[-1].loss if trainer.history else None,
        "task": run.task_name,
        "model": run.source.display,
        "out": run.out,
        "samples_after": after.get("samples"),
        "data": run.data_stats,
        "saved": "model" if run.trains_base else "adapter",
        "config": run.cfg.to_dict(),
        **run.extra,
        "extra_fields": sorted(run.extra),
    }
