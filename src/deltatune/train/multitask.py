"""Several adapters trained in one run: ``deltatune train --data NAME=FILE --data NAME=FILE ...``.

One frozen base, one adapter per named data set (the task), all trained together: every
micro-batch holds the rows of every task that still has steps, each row routed to its own
task's adapter (a mixed batch, :func:`deltatune.adapter_rows`), so the base runs once per
micro-batch for all tasks instead of once per task.

Each task follows exactly the plan a run of that task alone follows (``deltatune train --data
FILE`` with the same options): its own data split and encoding, its adapter's initial values (the
seed is set before each adapter is injected, as before the one adapter of a single run), its
windows of micro-batches (:func:`deltatune.train.loop.plan_windows`, same seed), its AdamW
optimizer with the weight-decay rule, its learning-rate schedule sized to its own steps, and its
own gradient clipping. The joint loss of a micro-batch is ``sum_t S_t / N_t`` (``S_t``: the summed
target cross-entropy of task t's rows, ``N_t``: the target count of t's whole window); a row only
reaches its task's adapter, so each adapter gets the gradient of its task alone, and the adapters
equal those of training each task alone (``tests/test_multitask.py``: 1e-5; rows are padded
together, so the batches are padded, never packed). A task whose plan is shorter stops stepping
when its plan ends.

Outputs: ``OUT/NAME/`` per task (the adapter in PEFT format, ``report.json``, ``metrics.jsonl``,
``curves.png``) and ``OUT/report.json`` for the run (tokens/s and wall time of the joint run, the
tasks' summaries).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.peft import atomic_write_bytes, save_adapter
from ..adapters import get_record
from ..inject import count_parameters, inject, parameter_groups
from ..integrations.transformers import resolve_model
from ..lifecycle import disable_adapter, set_adapter
from ..routing import adapter_rows
from .distributed import launched_world
from .config import TrainConfig, UsageError, absolute_paths
from .data import IGNORE_INDEX, collate, count_targets, pad_id_of
from .evaluate import Evaluator, PerplexityProbe
from .loop import NonFiniteLoss, StepLog, adamw, lr_factor, plan_windows
from .loss import _accepts_logits_to_keep, _head_of, head_cross_entropy, head_stands_aside
from .outputs import check_out, prepare_out, write_marker
from .pipeline import build_method_config, encode_data, load_base, method_preset, read_data, run_precision
from .precision import Precision, to_device
from .report import MetricsLog, counted, format_table, peak_rss_bytes, plot_curves, write_report


def _say(log, msg):
    if log is not None:
        log(msg)


# ----------------------------------------------------------------------------- the loss


def task_loss_sums(model: nn.Module, batch: dict, groups: list) -> list:
    """``[(S_t, N_t)]`` for each group of rows (int64 index tensors) of one collated batch, from one
    forward: what :func:`deltatune.train.loss.token_loss_sum` returns for those rows alone (the
    summed target cross-entropy, a float32 scalar with grad, and the target count), computed the
    same way (the head path where it applies: only target rows meet the head, in chunks)."""
    ids, labels = batch["input_ids"], batch["labels"]
    T = ids.shape[1]
    valid = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    zero = torch.zeros((), dtype=torch.float32, device=ids.device)
    if len(valid) == 0:
        return [(zero, 0) for _ in groups]
    first = int(valid[0])
    keep = T - first
    kwargs = {"input_ids": ids, "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if _accepts_logits_to_keep(model) and keep < T:
        kwargs["logits_to_keep"] = keep
    y = labels[:, first + 1:]  # (B, keep-1)
    sel = y != IGNORE_INDEX
    head = _head_of(model)
    if head is not None:
        with head_stands_aside(head):
            out = model(**kwargs)
        hidden = out.logits if hasattr(out, "logits") else out[0]
        if hidden.shape[-1] == head.in_features and hidden.shape[-1] != head.out_features:
            h = hidden[:, -keep:][:, :-1]  # (B, keep-1, D)
            res = []
            for rows in groups:
                s = sel[rows]
                n = int(s.sum())
                res.append((head_cross_entropy(h[rows][s], head.weight, head.bias, y[rows][s])[0], n) if n
                           else (zero, 0))
            return res
    out = model(**kwargs)
    lg = (out.logits if hasattr(out, "logits") else out[0])[:, -keep:][:, :-1]
    res = []
    for rows in groups:
        s = sel[rows]
        n = int(s.sum())
        res.append((F.cross_entropy(lg[rows][s].float(), y[rows][s], reduction="sum"), n) if n else (zero, 0))
    return res


# ----------------------------------------------------------------------------- the joint trainer


@dataclass
class Task:
    """One task of a joint run: its adapter (``name``), training items, plan and optimizer state."""

    name: str
    items: list
    params: list
    plan: list  # windows of micro-batches of item indices (plan_windows)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    train_tokens: int = 0


class JointTrainer:
    """Trains one adapter per task over one model in mixed batches (module docstring).

    ``tasks``: ``{name: encoded items}``, each name an adapter of ``model`` (all of them active, so
    trainable). The other arguments mean what :class:`deltatune.train.loop.Trainer`'s do and apply
    to every task. ``evaluate(name, step) -> dict`` is called after every ``eval_every`` steps of a
    task and after its last one; ``on_step(name, StepLog)`` after each of its steps.
    """

    def __init__(self, model: nn.Module, tasks: dict, *, pad_id: int = 0, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 0, schedule: str = "cosine",
                 lr_floor: float = 0.0, warmup_from_zero: bool = False, max_grad_norm: Optional[float] = None,
                 batch_size: int = 16, grad_accum: int = 1, epochs: int = 1,
                 max_steps: Optional[int] = None, seed: int = 0, eval_every: int = 0,
                 evaluate: Optional[Callable] = None, on_step: Optional[Callable] = None,
                 precision: Optional[Precision] = None, progress: bool = False):
        self.model, self.pad_id, self.max_grad_norm = model, pad_id, max_grad_norm
        self.seed, self.eval_every, self.evaluate, self.on_step = seed, eval_every, evaluate, on_step
        self.progress = progress
        decay, keep = parameter_groups(model)
        self.tasks = []
        for name, items in tasks.items():
            own = {id(p) for p in get_record(model, name).parameters(model) if p.requires_grad}
            if not own:
                raise ValueError(f"adapter {name!r} has no trainable parameters: set_adapter every task's adapter")
            plan = plan_windows(len(items), batch_size, grad_accum, epochs, seed, max_steps)
            opt = adamw([{"params": [p for p in decay if id(p) in own], "weight_decay": weight_decay},
                         {"params": [p for p in keep if id(p) in own], "weight_decay": 0.0}], lr)
            total, warm = len(plan), int(warmup_steps)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s, T=total: lr_factor(s, T, warm, schedule, lr_floor, warmup_from_zero))
            self.tasks.append(Task(name, list(items), [p for p in model.parameters() if id(p) in own], plan, opt, sched))
        self.precision = precision or Precision(self.tasks[0].params[0].device)
        self.scaler = self.precision.grad_scaler()
        self.total_steps = max(len(t.plan) for t in self.tasks)
        self.step = 0
        self.train_tokens = 0
        self.train_seconds = 0.0

    def train_step(self) -> dict:
        """Step ``self.step`` of every task that has one: forward/backward its micro-batches mixed with
        the other tasks', then its own clipping and optimizer step. Returns ``{name: StepLog}``."""
        t0 = time.perf_counter()
        live = [t for t in self.tasks if self.step < len(t.plan)]
        windows = {t.name: [[t.items[i] for i in mb] for mb in t.plan[self.step]] for t in live}
        n_window = {t.name: sum(count_targets(collate(mb, self.pad_id)) for mb in windows[t.name]) for t in live}
        sums = {t.name: 0.0 for t in live}
        tokens = {t.name: 0 for t in live}
        for j in range(max(len(w) for w in windows.values())):
            parts = [(t.name, windows[t.name][j]) for t in live if j < len(windows[t.name])]
            rows, names, groups = [], [], []
            for name, mb in parts:
                groups.append(torch.arange(len(rows), len(rows) + len(mb)))
                rows += mb
                names += [name] * len(mb)
                tokens[name] += sum(len(it["input_ids"]) for it in mb)
            batch = to_device(collate(rows, self.pad_id), self.precision.device)
            groups = [g.to(self.precision.device) for g in groups]
            with adapter_rows(self.model, names), self.precision.autocast():  # backward inside: checkpointing
                per_task = task_loss_sums(self.model, batch, groups)
                loss = sum(s / n_window[name] for (name, _), (s, n) in zip(parts, per_task) if n)
                if torch.is_tensor(loss):
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
            for (name, _), (s, n) in zip(parts, per_task):
                sums[name] += float(s.detach())
        logs = {}
        for t in live:
            if self.scaler:
                self.scaler.unscale_(t.optimizer)
            gn = float(torch.nn.utils.clip_grad_norm_(t.params, self.max_grad_norm)) if self.max_grad_norm else None
            lr = float(t.optimizer.param_groups[0]["lr"])
            skipped = self.scaler is not None and gn is not None and not math.isfinite(gn)
            if not math.isfinite(sums[t.name]) or (gn is not None and not math.isfinite(gn) and not skipped):
                for u in live:
                    u.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"training of task {t.name!r} diverged at step {self.step + 1}: loss "
                                    f"{sums[t.name] / max(1, n_window[t.name]):.4g}, gradient norm {gn} (lr {lr:g}); "
                                    "nothing was updated: lower --lr or keep gradient clipping on (--max-grad-norm 1)")
            logs[t.name] = (gn, lr)
        seconds = time.perf_counter() - t0
        for t in live:
            (self.scaler.step(t.optimizer) if self.scaler else t.optimizer.step())
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        out = {}
        for t in live:
            gn, lr = logs[t.name]
            out[t.name] = StepLog(step=self.step + 1, loss=sums[t.name] / max(1, n_window[t.name]), lr=lr,
                                  grad_norm=gn, targets=n_window[t.name], tokens=tokens[t.name], seconds=seconds)
        return out

    def fit(self) -> None:
        """Every step of every task's plan, with evaluations."""
        torch.manual_seed(self.seed)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, unit="step", desc="train", dynamic_ncols=True, leave=True)
        try:
            self.model.train()
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                logs = self.train_step()
                self.train_seconds += time.perf_counter() - t0
                self.step += 1
                for t in self.tasks:
                    log = logs.get(t.name)
                    if log is None:
                        continue
                    t.history.append(log)
                    t.train_tokens += log.tokens
                    self.train_tokens += log.tokens
                    if self.on_step is not None:
                        self.on_step(t.name, log)
                    last = self.step == len(t.plan)
                    if self.evaluate is not None and (last or (self.eval_every and self.step % self.eval_every == 0)):
                        t.evals.append((self.step, self.evaluate(t.name, self.step)))
                if bar is not None:
                    bar.set_postfix(tok_s=f"{self.train_tokens / max(self.train_seconds, 1e-9):.0f}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        self.model.eval()


# ----------------------------------------------------------------------------- the run


def run_multitask(cfg: TrainConfig, log: Optional[Callable] = print, progress: Optional[bool] = None) -> dict:
    """``deltatune train`` with ``cfg.tasks`` (``{name: data file}``); returns the run's report
    (also written to ``OUT/report.json``; each task's into ``OUT/NAME/report.json``)."""
    return multitask_session(cfg, log, progress)["report"]


def multitask_session(cfg: TrainConfig, log: Optional[Callable] = print, progress: Optional[bool] = None) -> dict:
    """:func:`run_multitask`, returning ``{"report", "model", "tokenizer", "trainer"}`` too."""
    t_start = time.time()
    resolve_model(cfg.model)  # a model that is not there fails before the data is read (a hub id: with its hint)
    cfg = absolute_paths(cfg)  # recorded so (each task's data too), they hold from any working directory
    tasks = dict(cfg.tasks or {})
    if not tasks:
        raise UsageError("no tasks: give --data NAME=FILE (one per adapter)")
    if launched_world()[0] > 1 or cfg.strategy != "auto":  # its own loop has no distributed pieces (yet)
        raise UsageError("a run of several tasks (--data NAME=FILE) runs in one process: start it without torchrun "
                         "and --strategy, or train each task in a run of its own, which runs on several processes")
    if cfg.packing == "on":
        raise UsageError("--packing on does not work with several --data tasks: their rows share padded batches")
    if cfg.torch_compile == "on":  # auto: not compiled (rows routed to several adapters per call)
        raise UsageError("--torch-compile on does not work with several --data tasks yet: use --torch-compile auto or off")
    check_out(cfg.out, cfg.overwrite, [*tasks, "report.json"])
    preset = method_preset(cfg.method)
    per_cfg = {n: _task_config(cfg, f) for n, f in tasks.items()}
    method_configs = {n: build_method_config(c) for n, c in per_cfg.items()}  # as each task's own run builds it
    data = {n: read_data(c, log) for n, c in per_cfg.items()}  # every file is read before the model loads
    precision, dtype = run_precision(cfg)
    _say(log, "loading model ...")
    model, tok, source = load_base(cfg.model, dtype, cfg.threads, precision.device)
    _say(log, f"model: {source.display} ({time.time() - t_start:.0f} s, {precision.device.type}, {precision.name}, "
              f"{counted(torch.get_num_threads(), 'thread')})")
    items, evaluators = {}, {}
    for n, (train_ex, eval_ex, _) in data.items():
        enc, items[n] = encode_data(per_cfg[n], tok, train_ex, log)
        evaluators[n] = Evaluator(tok, eval_ex, enc, size=cfg.eval_size or None, loss_size=cfg.eval_loss_size,
                                  batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                  precision=precision) if eval_ex else None
    extra = dict(preset.prepare(model, dict(cfg.method_options)) or {}) if preset.prepare else {}
    for n in tasks:
        torch.manual_seed(cfg.seed)  # each adapter starts where the task's own run would start it
        inject(model, method_configs[n], n)
    set_adapter(model, list(tasks))  # all trainable; every forward routes rows (adapter_rows)
    trainable, total = count_parameters(model)
    _say(log, f"method: {cfg.method}, {len(tasks)} adapters, trainable params {trainable:,d} of {total:,d}")
    out = prepare_out(cfg.out, cfg.overwrite, "train", [*tasks, "report.json"], config=cfg.to_dict())
    metrics = {}
    for n in tasks:
        os.makedirs(os.path.join(out, n), exist_ok=True)
        metrics[n] = MetricsLog(os.path.join(out, n, "metrics.jsonl"))
    probe = PerplexityProbe(tok, cfg.ppl_size, precision=precision) if cfg.ppl_size else None

    _say(log, "scoring the base model ...")
    before = {}
    with disable_adapter(model):
        for n, ev in evaluators.items():
            before[n] = ev(model, 0) if ev else {}
            if before[n]:
                metrics[n].write({"kind": "eval", **{k: v for k, v in before[n].items() if k != "samples"}})
        ppl_before = probe(model) if probe else None

    def evaluate(name, step):
        if evaluators[name] is None:
            return {}
        with adapter_rows(model, [name], expand=True):
            res = evaluators[name](model, step)
        metrics[name].write({"kind": "eval", **{k: v for k, v in res.items() if k != "samples"}})
        _say(log, f"{name} step {step}: {res['metric_name']} = {res['metric']:.3f}")
        return res

    def on_step(name, s):
        metrics[name].write({"kind": "train", "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
                             "targets": s.targets, "tokens": s.tokens, "seconds": s.seconds,
                             "tokens_per_s": s.tokens / max(s.seconds, 1e-9)})

    trainer = JointTrainer(
        model, items, pad_id=pad_id_of(tok), lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        schedule=cfg.schedule, lr_floor=cfg.lr_floor, warmup_from_zero=cfg.warmup_from_zero,
        max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        epochs=cfg.epochs, max_steps=cfg.max_steps, seed=cfg.seed, eval_every=cfg.eval_every, evaluate=evaluate,
        on_step=on_step, precision=precision, progress=cfg.progress if progress is None else progress)
    _say(log, f"training: {trainer.total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} examples per task, "
              f"{len(tasks)} tasks in each batch ({precision.name})")
    trainer.fit()

    reports = {}
    for t in trainer.tasks:
        n = t.name
        cfg_n = get_record(model, n).config
        cfg_n.base_model_name_or_path = source.display
        if getattr(cfg_n, "task_type", "") is None:
            cfg_n.task_type = "CAUSAL_LM"
        save_adapter(model, os.path.join(out, n), adapter_name=n)
        with adapter_rows(model, [n], expand=True):
            ppl_after = probe(model) if probe else None
        after = t.evals[-1][1] if t.evals else {}
        own = sum(p.numel() for p in t.params)
        rep = {
            "method": cfg.method, "task": n, "data": tasks[n], "metric_name": (after or before[n]).get("metric_name"),
            "metric_before": before[n].get("metric"), "metric_after": after.get("metric"), "trainable_params": own,
            "total_params": total - trainable + own, "peak_rss_bytes": peak_rss_bytes(),
            "wall_seconds": time.time() - t_start, "train_tokens": t.train_tokens,
            # the joint run's rate (every task's tokens: the tasks train in the same steps)
            "train_tokens_per_s": trainer.train_tokens / max(trainer.train_seconds, 1e-9),
            "out": os.path.join(out, n), "perplexity_before": ppl_before,
            "perplexity_after": ppl_after, "eval_loss_before": before[n].get("eval_loss"),
            "eval_loss_after": after.get("eval_loss"), "steps": len(t.plan), "joint_run": out,
            "final_loss": t.history[-1].loss if t.history else None, "samples_after": after.get("samples"),
            "config": {**cfg.to_dict(), "data": tasks[n], "tasks": None}, **extra, "extra_fields": sorted(extra),
        }
        write_report(os.path.join(out, n, "report.json"), rep)
        metrics[n].close()
        if cfg.plot:
            try:
                plot_curves(metrics[n].rows, os.path.join(out, n, "curves.png"), title=f"{cfg.method} on {n}")
            except Exception as e:  # a plotting failure must not lose the run
                _say(log, f"warning: {n}/curves.png not written: {e}")
        reports[n] = rep
        _say(log, f"\n[{n}]\n" + format_table(rep))
    report = {
        "method": cfg.method, "tasks": {n: {k: r[k] for k in ("data", "metric_name", "metric_before", "metric_after",
                                                              "eval_loss_after", "train_tokens", "steps",
                                                              "final_loss")} for n, r in reports.items()},
        "trainable_params": trainable, "total_params": total, "steps": trainer.total_steps,
        "train_tokens": trainer.train_tokens, "train_seconds": trainer.train_seconds,
        "train_tokens_per_s": trainer.train_tokens / max(trainer.train_seconds, 1e-9),
        "wall_seconds": time.time() - t_start, "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads(),
        "device": str(precision.device), "precision": precision.name, "model": source.display, "out": out,
        "config": cfg.to_dict(),
    }
    atomic_write_bytes(os.path.join(out, "report.json"), (json.dumps(report, indent=2, default=str) + "\n").encode())
    write_marker(out, "train", status="finished")
    return {"report": report, "model": model, "tokenizer": tok, "trainer": trainer}


def _task_config(cfg: TrainConfig, data_file: str) -> TrainConfig:
    """The options of the task's own run: ``cfg`` with ``data`` = its file."""
    return dataclasses.replace(cfg, data=data_file, eval_data=None, tasks=None)
