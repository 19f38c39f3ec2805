"""The one training loop (every method: it only sees trainable parameters and the model's forward).

Loss. The loss of an optimizer step is the sum of the cross-entropies of every target token in
the step's accumulation window, divided by the number of target tokens in the whole window::

    loss = sum_{micro-batches m} sum_{targets t in m} -log p(y_t | y_<t)  /  N_window

Each micro-batch back-propagates its own sum divided by ``N_window`` (known before the first
forward, from the labels), so batch 4 x accumulation 1, batch 1 x accumulation 4 and any other
split give the same gradient, and the logged loss is that same number (regression case C16).
The sum comes from :func:`deltatune.train.loss.token_loss_sum`: only the target positions' hidden
states meet the vocabulary projection, in chunks, so no full-vocabulary logits are held.

Steps. ``step`` always means an optimizer step. An epoch is a seeded shuffle of the training
examples cut into micro-batches of ``batch_size`` (the last one may be smaller); micro-batches
are grouped into accumulation windows of ``grad_accum``, and no window spans two epochs. The short
last window of an epoch (fewer than ``grad_accum`` micro-batches) IS stepped, normalised by its
own target count as any window. ``max_steps`` caps the number of optimizer steps. The learning-rate
schedule is sized to the number of optimizer steps actually taken and moves only after an
optimizer step (C23): with peak ``lr``, ``warmup_steps`` W and T steps, the LR of step s
(0-based) is ``lr * s / W`` for s < W, then ``lr * (1 + cos(pi * (s - W) / (T - W))) / 2``
("cosine"; "constant" keeps ``lr``). After the last step the scheduler stands at its end (LR 0).

Methods that act during training (AdaLoRA's rank allocator) give the loop
:class:`~deltatune.inject.TrainHook` objects (:func:`deltatune.inject.train_hooks`): a loss term
added once per optimizer step (each micro-batch adds it weighted by its share of the window's
target tokens; the logged loss is the cross-entropy alone) and a call after each optimizer step,
before the gradients are cleared.

AdamW's weight decay applies only to tensors whose neutral value is 0 (LoRA A/B, bottleneck and
prompt weights), never to DoRA magnitudes, (IA)3 vectors, learned scalings, ``modules_to_save``
copies or biases (:func:`deltatune.inject.parameter_groups`).

Gradient clipping (``max_grad_norm``) takes the norm once per optimizer step over the whole
accumulated gradient. A step whose loss or gradient is NaN or infinite is not taken
(:class:`NonFiniteLoss`; under fp16 an overflow is the grad scaler's to skip). Randomness: the data order comes from its own generator seeded with
``seed``; dropout draws from torch's global generator, seeded with ``seed`` at the start;
evaluation (see :mod:`deltatune.train.evaluate`) never touches either.

Several processes (``torchrun``; :mod:`deltatune.train.distributed`): the plan is the one of a single
process with the combined batch ``batch_size x world``; each process runs its rows of every micro-batch,
``N_window`` is summed over the processes before the first forward, the gradients are summed after the
last backward, and the logged loss and token counts are global; so the run equals one process with the
combined batch. Dropout draws from ``seed + rank``.

Resuming. :meth:`Trainer.state_dict` holds everything the rest of the run depends on (the
trainable tensors, the optimizer, the scheduler, the fp16 grad scaler, the RNG states, the number
of windows of the plan done, the counters and evaluations so far); a fresh ``Trainer`` of the same
plan given it by :meth:`Trainer.load_state_dict` continues where the first stopped, and ends with
the same adapter, bit for bit on the same machine and threads (:mod:`deltatune.train.checkpoint`
stores it as safetensors + JSON).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..inject import parameter_groups, train_hooks
from .data import collate, count_targets
from .distributed import SINGLE, Dist
from .loss import token_loss_sum
from .packing import pack, share_prefix
from .precision import Precision, to_device

# ----------------------------------------------------------------------------- optimizer, plan and schedule

_FUSED_DEVICES = ("cpu", "cuda")


def adamw(groups: list, lr: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over parameter groups (dicts with ``params`` and ``weight_decay``), with
    torch's fused kernel (``fused=True``) when every tensor is a plain floating tensor on the CPU or
    a CUDA device: one kernel per group of tensors instead of about ten ops per tensor (SmolLM2's 420
    LoRA tensors: 18 ms -> 6 ms a step on 2 cores). Same update rule; results agree with the
    per-tensor loop to float rounding. Sharded (FSDP's DTensor) or other tensors keep torch's default."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point()
                                 and p.device.type in _FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused else None)


def micro_batches_of_epoch(n_items: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Index lists of one epoch's micro-batches: a seeded permutation cut into ``batch_size`` chunks."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n_items, generator=g).tolist()
    return [perm[i: i + batch_size] for i in range(0, n_items, batch_size)]


def plan_windows(n_items: int, batch_size: int, grad_accum: int, epochs: int, seed: int,
                 max_steps: Optional[int] = None) -> list[list[list[int]]]:
    """The accumulation windows of a run: a list (one per optimizer step) of micro-batch index lists.

    No window spans two epochs; an epoch's short last window is kept. ``max_steps`` cuts the plan
    (and, when it exceeds one pass over ``epochs``, more epochs are added until it is reached).
    """
    if n_items <= 0:
        raise ValueError("no training examples")
    windows = []
    epoch = 0
    while True:
        mbs = micro_batches_of_epoch(n_items, batch_size, epoch, seed)
        for i in range(0, len(mbs), grad_accum):
            windows.append(mbs[i: i + grad_accum])
        epoch += 1
        if max_steps is None and epoch >= epochs:
            break
        if max_steps is not None and len(windows) >= max_steps:
            break
    return windows[:max_steps] if max_steps is not None else windows


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", floor: float = 0.0,
              warmup_from_zero: bool = False) -> float:
    """LR multiplier of optimizer step ``step`` (0-based) of ``total``; 0 at step == total.

    Warm-up: ``(step + 1) / W`` (default: the first step already moves) or, with ``warmup_from_zero``,
    ``step / W`` (the first step runs at 0). Cosine decays from 1 to ``floor`` at the last step.
    """
    if step >= total:
        return 0.0
    if step < warmup:
        return (step if warmup_from_zero else step + 1) / max(1, warmup)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------- RNG states (as tensors)


def rng_state() -> dict:
    """torch's CPU (and, where initialised, every CUDA device's) and Python's ``random`` RNG states."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.random.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states for the devices present)."""
    torch.random.set_rng_state(state["torch"].to(torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda[:n]])


# ----------------------------------------------------------------------------- trainer


class NonFiniteLoss(ValueError):
    """The loss or the gradient norm of a step is NaN or infinite (the step is not taken)."""


class TrainingInterrupted(Exception):
    """The run stopped after a whole step because ``stop_requested`` said so (a signal); ``step`` steps
    are done. ``signum``: the signal (exit code 128 + signum)."""

    def __init__(self, step: int, message: str = "", signum: int = 2):
        super().__init__(message or f"training interrupted after step {step}")
        self.step, self.signum = step, signum


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: Optional[float]
    targets: int
    tokens: int  # real (unpadded) tokens in the window
    seconds: float


@dataclass
class Trainer:
    """Runs the plan: ``Trainer(model, items, ...).fit()``.

    Args:
        model: any model whose trainable parameters (``requires_grad``) are the adapter's.
        items: encoded examples ``{"input_ids", "labels"}`` (see :class:`ChatEncoder`).
        pad_id: id used to fill padding (never used to find padding).
        evaluate: ``fn(model, step) -> dict`` called (in eval mode, no grad, RNG untouched: the
            function is responsible, see :func:`deltatune.train.evaluate.evaluation_mode`) after
            every ``eval_every`` optimizer steps and after the last one; and before the first when
            ``eval_at_start``.
        on_step / on_eval / checkpoint: callbacks ``(StepLog)``, ``(step, dict)``, ``(step)``.
        stop_requested: asked after every step; when it returns True, :meth:`fit` raises
            :class:`TrainingInterrupted` (the step is done, its evaluation and checkpoint too).
        precision: the run's device and compute dtype (:mod:`deltatune.train.precision`; default:
            float32 on the model's device): batches go to the device, forward passes run under its
            autocast, fp16 steps through a gradient scaler.
        packing: micro-batches are packed rows (:func:`deltatune.train.packing.pack`) instead of
            right-padded ones; the loss is the same.
        shared_prefix: the leading tokens that a micro-batch's rows share (and that hold no target)
            run once (:func:`deltatune.train.packing.share_prefix`); the loss is the same.
        dist: this process's place in a multi-process run (:func:`deltatune.train.distributed.setup`;
            default: a single process); ``batch_size`` is then per process.

    Attributes ``optimizer`` and ``scheduler`` exist after construction (tests hook them).
    """

    model: nn.Module
    items: Sequence[dict]
    pad_id: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    lr_floor: float = 0.0
    warmup_from_zero: bool = False
    max_grad_norm: Optional[float] = None
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None
    seed: int = 0
    eval_every: int = 0
    eval_at_start: bool = False
    save_every: int = 0
    evaluate: Optional[Callable] = None
    on_step: Optional[Callable] = None
    on_eval: Optional[Callable] = None
    checkpoint: Optional[Callable] = None
    progress: bool = False
    precision: Optional[Precision] = None
    packing: bool = False
    shared_prefix: bool = False
    dist: Optional[Dist] = None
    stop_requested: Optional[Callable[[], bool]] = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: inject an adapter first")
        if self.precision is None:
            self.precision = Precision(self.params[0].device)
        self.scaler = self.precision.grad_scaler()
        self.dist = self.dist or SINGLE
        if self.dist.lockstep:  # a sharded model: every process makes the same model calls
            self.shared_prefix = False
        self.plan = plan_windows(len(self.items), self.batch_size * self.dist.world, self.grad_accum, self.epochs,
                                 self.seed, self.max_steps)  # the combined batch of every process
        self.total_steps = len(self.plan)
        decay, keep = parameter_groups(self.model)  # weight decay only where 0 is the neutral value
        self.optimizer = adamw([{"params": decay, "weight_decay": self.weight_decay},
                                {"params": keep, "weight_decay": 0.0}], self.lr)
        total, warm, sched = self.total_steps, int(self.warmup_steps), self.schedule
        floor, from_zero = self.lr_floor, self.warmup_from_zero
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, warm, sched, floor, from_zero))
        self.hooks = train_hooks(self.model, self.total_steps)  # methods acting during training (AdaLoRA)
        self.step = 0
        self.train_tokens = 0
        self.train_seconds = 0.0
        self.evals: list = []
        self._resumed = False

    def _plan_key(self) -> dict:
        return {"n_items": len(self.items), "batch_size": self.batch_size * self.dist.world,  # the combined batch
                "grad_accum": self.grad_accum,
                "epochs": self.epochs, "seed": self.seed, "max_steps": self.max_steps, "total_steps": self.total_steps}

    def _trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        """The state the rest of the run depends on (tensors and plain values, nothing else): the trainable
        tensors by name, the optimizer's and scheduler's (and fp16 grad scaler's) states, the torch and
        Python RNG states, ``step`` (the number of windows of the plan done), the counters and the
        evaluations so far, and the plan's arguments (checked on load). Several processes: every process
        must call it (sharded tensors are gathered whole; every process's RNG states are in ``rng_ranks``)."""
        state = {"step": self.step, "plan": self._plan_key(), "train_tokens": self.train_tokens,
                 "train_seconds": self.train_seconds, "evals": [[s, r] for s, r in self.evals],
                 "params": {n: p.detach() for n, p in self._trainable().items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rng_state()}
        if self.dist.active:
            state["rng_ranks"] = self.dist.gather_object(state["rng"])
        return self.dist.full_state(state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of a run of the same plan and model: :meth:`fit` then runs the
        windows not done yet, drawing the random numbers the first run would have drawn.

        Raises:
            ValueError: another plan (names the argument), or other trainable tensors (names them).
        """
        plan = self._plan_key()
        for k, v in plan.items():
            if state["plan"].get(k) != v:
                raise ValueError(f"the state is of another plan: {k} {state['plan'].get(k)!r} there, {v!r} here")
        params, saved = self._trainable(), state["params"]
        bad = sorted(set(params) ^ set(saved)) or sorted(n for n in params if saved[n].shape != params[n].shape)
        if bad:
            raise ValueError(f"the state holds other trainable tensors than the model: {', '.join(bad[:4])}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.dist.shard_like(saved[n], p))  # FSDP: this process's shard of the whole tensor
        kernels = [(g.get("fused"), g.get("foreach")) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(self.dist.optimizer_state_like(state["optimizer"], self.optimizer))
        for g, (fused, foreach) in zip(self.optimizer.param_groups, kernels):  # this run's kernel choice (adamw),
            g["fused"], g["foreach"] = fused, foreach  # not the saved one (another version, or unsharded)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks")  # the same number of processes: each its own stream; else rank 0's
        set_rng_state(ranks[self.dist.rank] if ranks and len(ranks) == self.dist.world else state["rng"])
        self.step = int(state["step"])
        self.train_tokens, self.train_seconds = int(state["train_tokens"]), float(state["train_seconds"])
        self.evals = [(int(s), r) for s, r in state["evals"]]
        self._resumed = True

    def _run_eval(self):
        if self.evaluate is None:
            return
        res = self.evaluate(self.model, self.step)
        self.evals.append((self.step, res))
        if self.on_eval is not None:
            self.on_eval(self.step, res)

    def batch(self, indices: Sequence[int]) -> dict:
        """The micro-batch of these items, collated (or packed), on the run's device."""
        rows = [self.items[i] for i in indices]
        b = share_prefix(rows, self.pad_id) if self.shared_prefix else None
        if b is None:
            b = pack(rows, self.pad_id) if self.packing else collate(rows, self.pad_id)
        return to_device(b, self.precision.device)

    def train_window(self, window: list[list[int]]) -> StepLog:
        """Forward/backward every micro-batch of one window, then clip and take one optimizer step."""
        t0 = time.perf_counter()
        d = self.dist
        shards = [d.shard(mb) for mb in window]  # this process's rows (all of them for a single process)
        # a sharded model needs every process in every forward: an empty share runs a row with weight 0
        batches = [(self.batch(s or mb[:1]), bool(s)) for s, mb in zip(shards, window) if s or d.lockstep]
        n_window = int(d.all_sum([sum(count_targets(b) for b, real in batches if real)])[0])
        total = 0.0
        for i, (b, real) in enumerate(batches):
            d.gradient_sync(self.model, i == len(batches) - 1)
            with self.precision.autocast():
                s, n = token_loss_sum(self.model, b)
            if n and not real:
                (s * 0.0).backward()
            elif n:
                loss = s / n_window
                for h in self.hooks:  # a per-step term (AdaLoRA's regulariser), spread by target share
                    term = h.loss_term(self.model)
                    if term is not None:
                        loss = loss + term * (n / n_window)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += float(s.detach())
        d.sync_grads(self.params)  # DDP: the trainable tensors' gradients summed over the processes
        tokens = int(sum(int(b["lengths"].sum()) for b, real in batches if real))
        total, tokens = d.all_sum([total, tokens])  # global figures (and the same non-finite verdict everywhere)
        tokens = int(tokens)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        gn = None
        if self.max_grad_norm:
            gn = d.clip_grad_norm(self.params, self.max_grad_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        skipped_by_scaler = self.scaler is not None and gn is not None and not math.isfinite(gn)
        grads_ok = (gn is None or math.isfinite(gn)) and (self.scaler is not None or gn is not None or
                                                          d.grads_finite(self.params))
        if not math.isfinite(total) or (not grads_ok and not skipped_by_scaler):
            self.optimizer.zero_grad(set_to_none=True)
            norm = f"gradient norm {gn:.4g}" if gn is not None else f"gradient {'finite' if grads_ok else 'not finite'}"
            raise NonFiniteLoss(f"training diverged at step {self.step + 1}: loss {total / max(1, n_window):.4g}, "
                                f"{norm} (lr {lr:g}); the step was not taken: lower --lr or keep "
                                "gradient clipping on (--max-grad-norm 1)")
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        for h in self.hooks:  # after the update, gradients still there (AdaLoRA scores and prunes ranks)
            h.after_step(self.model, self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return StepLog(step=self.step + 1, loss=total / max(1, n_window), lr=lr, grad_norm=gn,
                       targets=n_window, tokens=tokens, seconds=time.perf_counter() - t0)

    def fit(self) -> list:
        """Run every window of the plan not done yet; return the list of :class:`StepLog` (of this call)."""
        if not self._resumed:  # a resumed run has its RNG states back (load_state_dict)
            torch.manual_seed(self.seed + self.dist.rank)  # dropout: a stream per process
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                       leave=True)
        try:
            if self.eval_at_start and not self._resumed:
                self._run_eval()
            self.model.train()
            for window in self.plan[self.step:]:
                log = self.train_window(window)
                self.step += 1
                self.train_tokens += log.tokens
                self.train_seconds += log.seconds
                self.history.append(log)
                if self.on_step is not None:
                    self.on_step(log)
                if bar is not None:
                    bar.set_postfix(loss=f"{log.loss:.3f}",
                                    tok_s=f"{self.train_tokens / max(self.train_seconds, 1e-9):.0f}",
                                    refresh=False)
                    bar.update(1)
                last = self.step == self.total_steps
                if self.evaluate is not None and (last or (self.eval_every and self.step % self.eval_every == 0)):
                    self._run_eval()
                if self.checkpoint is not None and self.save_every and self.step % self.save_every == 0 and not last:
                    self.checkpoint(self.step)
                if self.stop_requested is not None and not last and self.dist.any(self.stop_requested()):
                    raise TrainingInterrupted(self.step)
        finally:
            if bar is not None:
                bar.close()
        self.model.eval()
        return self.history
