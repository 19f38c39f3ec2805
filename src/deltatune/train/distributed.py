"""Scale-out: one training run on N processes of PyTorch's own engine (``torch.distributed``).

Launch the ``deltatune`` command under ``torchrun`` (or ``accelerate launch``, which starts it the same
way); nothing else changes::

    torchrun --nproc-per-node 2 -m deltatune train --max-steps 20 ...
    accelerate launch --multi-gpu --num-processes 2 -m deltatune train ...   # (CPU too: gloo)

The launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
makes :func:`setup` join a process group: gloo on the CPU, NCCL on CUDA (each process takes the GPU of
its ``LOCAL_RANK``). Without it (``WORLD_SIZE`` unset or 1) :func:`setup` returns :data:`SINGLE` and
every function here is a no-op, so the one loop (:mod:`deltatune.train.loop`) reads the same either way.

Arithmetic. The plan of optimizer steps is the one of a single process with the *combined* batch
``batch_size x N`` (:func:`deltatune.train.loop.plan_windows`); process ``r`` runs rows ``r, r + N, ...``
of every micro-batch (:meth:`Dist.shard`). The target count of the window is summed over the processes
(:meth:`Dist.all_sum`) before the first forward, each process back-propagates its own cross-entropy sum
divided by that global count, and the gradients are **summed** (not averaged) over the processes. So
N processes x batch B compute the gradient, the logged loss and the update of one process with batch
N x B, term for term (up to float rounding of the different batch shapes).

Strategies (``--strategy``, default ``ddp`` when there is more than one process):

* ``ddp``: every process holds the whole model. After the window's last backward the gradients of the
  trainable tensors only (the adapter's; the frozen base has none) are summed over the processes in
  flat buckets by ``torch.distributed.all_reduce`` (:meth:`Dist.sync_grads`), once per optimizer step:
  what ``DistributedDataParallel``'s reducer does under ``no_sync`` with a sync on the last micro-batch.
  The ``DistributedDataParallel`` wrapper itself is not used: the loss calls the model twice for a
  shared prefix and reads the output head off the model (:mod:`deltatune.train.loss`), a rank whose
  share of a short last micro-batch is empty runs no forward, and adapter gradients are a few MiB that
  one bucketed all-reduce per step moves in milliseconds; so the fast path (bf16, packed rows, shared
  prefix, the head-chunked loss) stays on unchanged.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block and on the root
  (:meth:`Dist.wrap`): the frozen base and the adapters are sharded over the processes, with their mixed
  dtypes (a bf16 base, fp32 adapters); the gradient reduce-scatter sums (divide factor 1). A torchao
  NF4 base shards too (``NF4Tensor`` implements FSDP2's all-gather hooks); a bitsandbytes 4-bit base is
  refused (:func:`check_fsdp`). Every process must run every forward (the all-gathers pair up), so a
  process whose share of a micro-batch is empty runs a row of it with weight 0, the shared prefix (a
  second model call on some processes only) is off, and evaluation runs on every process in lockstep.

Checkpoints (:class:`SharedSaver`) hold whole tensors (FSDP: the adapter and AdamW's state gathered) and
every process's RNG state, so a run resumes on any number of processes with the same combined batch.

Outputs. Rank 0 alone writes (the output folder, metrics, checkpoints, the adapter, the report, the
plot); logged figures are global (loss and tokens summed over processes). The adapter file holds the
full tensors: under FSDP they are gathered (:meth:`Dist.full_parameters`) before rank 0 saves.

Failures. Every collective has the process group's timeout (``DELTATUNE_DIST_TIMEOUT`` seconds,
default 1800). When a process dies, the others' next collective fails (gloo: the connection closes;
at the latest the timeout) and :func:`lost_contact` turns that into one line naming the rank.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import gc
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..adapters import get_state
from ..inject import method_for
from ..targets import is_adapter_path
from .config import STRATEGIES, UsageError
from .report import peak_rss_bytes

try:  # FSDP2 (torch >= 2.6; absent where torch.distributed is not built)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import distribute_tensor
except ImportError:  # pragma: no cover
    init_device_mesh = FSDPModule = fully_shard = distribute_tensor = None

TIMEOUT_ENV = "DELTATUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
BUCKET_ELEMENTS = 1 << 23  # gradient elements per all-reduce bucket (32 MiB in float32)


class DistributedError(RuntimeError):
    """A collective failed: another process stopped, or the process group's timeout passed."""


def launched_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the launcher's environment (torchrun, accelerate launch);
    (1, 0, 0) when the process was not started by one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return world, rank, local


def timeout_seconds() -> float:
    """The process group's timeout: ``DELTATUNE_DIST_TIMEOUT`` seconds (default 1800).

    Raises:
        UsageError: a value that is not a number > 0.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds > 0 (default {DEFAULT_TIMEOUT_S:.0f})")
    return t


def _sum32(g: torch.Tensor) -> torch.Tensor:
    """A gradient's sum as a float32 (or float64) scalar (half-precision sums would overflow at 65,504)."""
    return g.sum() if g.dtype in (torch.float32, torch.float64) else g.float().sum()


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``strategy`` ("none" for a
    single process, "ddp" or "fsdp"). Build it with :func:`setup`; :data:`SINGLE` is the one-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False  # this process called init_process_group (and destroys the group in close())
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """Every process must run every forward pass (the model is sharded)."""
        return self.strategy == "fsdp"

    # ------------------------------------------------------------------ the plan and its figures

    def shard(self, micro_batch: Sequence[int]) -> list:
        """This process's rows of a micro-batch of the combined plan: rows ``rank, rank + world, ...``
        (may be empty when the micro-batch has fewer rows than processes)."""
        return list(micro_batch[self.rank::self.world])

    def all_sum(self, values: Sequence[float]) -> list:
        """``values`` summed over the processes (float64: integers stay exact below 2**53)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        with lost_contact(self, "summing the step's counts"):
            torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_object(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        with lost_contact(self, "gathering figures"):
            torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        with lost_contact(self, "waiting for rank 0"):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (a stop asked of one process stops them all at the
        same step)."""
        return bool(flag) if not self.active else self.all_sum([1.0 if flag else 0.0])[0] > 0

    # ------------------------------------------------------------------ state of a checkpoint

    def full_state(self, obj):
        """``obj`` (nested dicts, lists, tuples, tensors) with every sharded tensor (DTensor) gathered whole:
        every process must call it, in the same order. No-op without sharded tensors."""
        if hasattr(obj, "full_tensor"):
            with lost_contact(self, "gathering a checkpoint"):
                return obj.full_tensor()
        if isinstance(obj, dict):
            return {k: self.full_state(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.full_state(v) for v in obj)
        return obj

    def shard_like(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` (a whole tensor, e.g. read from a checkpoint) sharded as ``like`` is (FSDP: this process's
        shard of it as a DTensor, no communication); ``full`` as it is when ``like`` is not sharded."""
        if not hasattr(like, "device_mesh"):
            return full
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)

    def optimizer_state_like(self, state: dict, optimizer) -> dict:
        """An optimizer ``state_dict`` of whole tensors (a checkpoint's) with each per-parameter tensor of its
        parameter's shape sharded as the parameter is (:meth:`shard_like`); as it is without sharding."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(hasattr(p, "device_mesh") for p in params):
            return state
        per = {}
        for idx, st in state["state"].items():
            p = params[int(idx)]
            per[idx] = {k: (self.shard_like(v, p) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)
                            else v) for k, v in st.items()}
        return {**state, "state": per}

    def barrier(self) -> None:
        if self.active:
            with lost_contact(self, "waiting at a barrier"):
                torch.distributed.barrier()

    def main_call(self, fn: Optional[Callable]) -> Optional[Callable]:
        """``fn`` run where it must run, its result (rank 0's) returned on every process: on rank 0 only
        (the others wait), or on every process in lockstep when the model is sharded (FSDP)."""
        if fn is None or not self.active:
            return fn

        def call(*args, **kwargs):
            res = fn(*args, **kwargs) if (self.is_main or self.lockstep) else None
            return self.broadcast_object(res)

        return call

    def first_on_main(self, fn: Callable):
        """``fn()`` on rank 0 only; its result, or the :class:`UsageError` it raised, on every process
        (the output folder is checked and made once, and every process fails with the same line)."""
        if not self.active:
            return fn()
        res, err = None, None
        if self.is_main:
            try:
                res = fn()
            except UsageError as e:
                err = str(e)
        res, err = self.broadcast_object((res, err))
        if err is not None:
            raise UsageError(err)
        return res

    # ------------------------------------------------------------------ gradients

    def sync_grads(self, params: Sequence[torch.Tensor]) -> None:
        """DDP: sum the gradients of ``params`` (the trainable tensors) over the processes, in flat
        buckets per dtype; a tensor without a gradient counts as zeros (and gets one). No-op for a
        single process and for FSDP (its backward reduce-scatters)."""
        if not self.active or self.strategy != "ddp":
            return
        by_dtype: dict = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        with lost_contact(self, "summing the gradients"):
            for grads in by_dtype.values():
                bucket, size = [], 0
                for g in grads + [None]:
                    if g is not None and (not bucket or size + g.numel() <= BUCKET_ELEMENTS):
                        bucket.append(g)
                        size += g.numel()
                        continue
                    if bucket:
                        flat = _flatten_dense_tensors(bucket)
                        torch.distributed.all_reduce(flat)
                        for g0, f in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                            g0.copy_(f)
                    bucket, size = ([g], g.numel()) if g is not None else ([], 0)

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over the whole (global) gradient; returns the norm before
        clipping. Sharded (FSDP) gradients: the norm of the full gradient, the same on every process."""
        gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        return float(gn)

    def grads_finite(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether every gradient of ``params`` is finite, the same verdict on every process (sharded
        gradients: each process checks its shards, then the verdicts are combined). One sum per tensor
        and one check (a NaN or infinity anywhere makes the total NaN or infinite; a sum past float32's
        range counts as not finite too) instead of a check and a sync per tensor (420 LoRA tensors:
        12 ms -> 3 ms a step)."""
        sums = [_sum32(g.to_local() if hasattr(g, "to_local") else g) for g in (p.grad for p in params) if g is not None]
        bad = 0 if not sums or bool(torch.isfinite(torch.stack(sums).sum())) else 1  # NaN/inf anywhere: not finite
        if self.lockstep:
            bad = self.all_sum([bad])[0]
        return bad == 0

    def gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """FSDP: whether the next backward reduce-scatters (off for all but a window's last micro-batch:
        the unsharded adapter gradients accumulate locally). No-op otherwise."""
        if self.strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(enabled)

    def broadcast_params(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of ``params`` on every process (DDP: the adapters start equal)."""
        if not self.active or self.strategy != "ddp":
            return
        with lost_contact(self, "copying rank 0's adapter"), torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    # ------------------------------------------------------------------ FSDP

    def wrap(self, model: nn.Module) -> nn.Module:
        """FSDP2: ``fully_shard`` every transformer block (:func:`transformer_blocks`) and the root, on a
        1-D mesh of the processes; gradients are summed (divide factor 1). Parameters are moved to the
        mesh's device. Returns ``model`` (the same object). No-op unless the strategy is fsdp."""
        if self.strategy != "fsdp":
            return model
        if fully_shard is None:
            raise UsageError(f"--strategy fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this "
                             f"torch is {torch.__version__}: upgrade torch or use --strategy ddp")
        # the head stands aside in the loss (train.loss), so the root returns its hidden states, a view; the
        # loss only reads it, never writes into it in place: FSDP2's warning about such writes does not apply
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(self.device.type, (self.world,))
        with lost_contact(self, "sharding the model"):
            for block in transformer_blocks(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        gc.collect()  # the whole tensors each process loaded are gone: give their pages back to the OS (glibc)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum over processes, as one process with the combined batch
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        return model

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module, which: Callable = lambda p: p.requires_grad):
        """Within the block the parameters selected by ``which`` (default: the trainable ones) are full,
        plain tensors on every process (FSDP: gathered, each once, in module order; restored after),
        so that :func:`deltatune.save_adapter` writes whole tensors. No-op unless sharded."""
        if self.strategy != "fsdp":
            yield model
            return
        swapped, done = [], {}
        _reshard(model)  # the same (sharded) state on every process, whatever rank 0 does inside the block
        with lost_contact(self, "gathering the adapter"), torch.no_grad():
            for mod in model.modules():
                for name, p in list(mod._parameters.items()):
                    if p is None or not hasattr(p, "full_tensor") or not which(p):
                        continue
                    if id(p) not in done:
                        done[id(p)] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                    swapped.append((mod, name, p))
                    mod._parameters[name] = done[id(p)]
        try:
            yield model
        finally:
            for mod, name, p in swapped:
                mod._parameters[name] = p
            _reshard(model)

    def close(self) -> None:
        """Leave the process group when this process made it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


SINGLE = Dist()


def _reshard(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` back to its sharded parameters (local: no communication). The root
    stays unsharded after a forward, and rank 0's writes (``state_dict`` hooks) may reshard it on rank 0
    only; the next forward's all-gathers pair up only when every process starts from the same state."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def transformer_blocks(model: nn.Module) -> list:
    """The model's transformer blocks (the FSDP units): modules whose class transformers names in
    ``_no_split_modules``, else the elements of the longest ``nn.ModuleList`` of one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for n, m in model.named_modules() if n and type(m).__name__ in names and not is_adapter_path(n)]
    if found:
        return found
    best: list = []
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and not is_adapter_path(n) \
                and len({type(b) for b in m}) == 1:
            best = list(m)
    return best


def check_fsdp(model: nn.Module, method: str, precision_name: str, trains_base: bool, world: int = 2) -> None:
    """Refuse what ``--strategy fsdp`` cannot run, in one line with the fix.

    Raises:
        UsageError: ``--method full``; a method acting during training (AdaLoRA); a prompt method;
            fp16 (use bf16); a bitsandbytes 4-bit base (its packed weight and quantization state are
            separate objects that FSDP2 cannot split and gather; torchao's NF4Tensor can); a torchao NF4
            weight whose rows, codes or scaler blocks do not split into ``world`` equal shards (FSDP2 cuts
            dimension 0, and torchao's NF4 split needs whole scaler blocks of 64 x 256 weights per shard).
    """
    fix = "use --strategy ddp"
    records = list(get_state(model).records.values()) if get_state(model) is not None else []
    has_train_hooks = any(method_for(r.config).train_hook is not None for r in records)
    prompt_learning = any(getattr(r.config, "is_prompt_learning", False) for r in records)
    if trains_base:
        raise UsageError(f"--strategy fsdp does not run --method full yet (it saves a whole model folder from "
                         f"sharded weights): {fix}")
    if has_train_hooks:
        raise UsageError(f"--strategy fsdp does not run --method {method}: its rank allocator reads whole "
                         f"gradients after each step, which FSDP shards: {fix}")
    if prompt_learning:
        raise UsageError(f"--strategy fsdp does not run --method {method}: its virtual tokens attach to the "
                         f"top model, not to a sharded block: {fix}")
    if precision_name == "fp16":
        raise UsageError("--strategy fsdp with --precision fp16 is not supported (the gradient scaler does not "
                         "handle sharded gradients): use --precision bf16")
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(w).__name__ == "Params4bit":
            raise UsageError(f"--strategy fsdp cannot shard the bitsandbytes 4-bit base ({n}): its packed weight and "
                             "its quantization state (absmax, code) are separate objects FSDP2 cannot split and "
                             "gather; use --method-opt quant_backend=torchao (NF4Tensor shards) or --strategy ddp")
        if type(w).__name__ == "NF4Tensor":
            inner = {k: getattr(w, k).numel() for k in ("quantized_scalers", "quantization_factor", "quantized_data")}
            if w.shape[0] % world or any(v % world for v in inner.values()):
                raise UsageError(f"--strategy fsdp cannot cut the NF4 weight of {n} {tuple(w.shape)} into {world} equal "
                                 f"shards ({inner['quantization_factor']} scaler blocks, {w.shape[0]} rows; each shard "
                                 f"needs whole ones): use fewer processes or --strategy ddp")


def setup(strategy: Optional[str] = "auto", device: Optional[torch.device] = None) -> Dist:
    """This process's :class:`Dist`: joins the launcher's process group when there is more than one
    process (gloo for a CPU ``device``, NCCL for CUDA; the group's timeout from
    :func:`timeout_seconds`), else :data:`SINGLE`.

    Raises:
        UsageError: an unknown ``strategy``; ``ddp``/``fsdp`` asked for in a single process (the
            message gives the launch command); ``cuda:N`` given to several processes.
    """
    strategy = (strategy or "auto").strip().lower()
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    world, rank, local = launched_world()
    if world <= 1:
        if strategy != "auto":
            raise UsageError(f"--strategy {strategy} needs more than one process, and this run has one: launch it "
                             f"with `torchrun --nproc-per-node N -m deltatune train ...` (or `accelerate launch "
                             f"--num-processes N -m deltatune train ...`), or leave --strategy out")
        return SINGLE
    device = device or torch.device("cpu")
    if device.type == "cuda":
        if device.index is not None and device.index != local and torch.cuda.device_count() > 1:
            raise UsageError(f"--device {device} with {world} processes: each process takes the GPU of its "
                             f"LOCAL_RANK; use --device cuda (or auto)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    t = timeout_seconds()
    owns = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=t))
        owns = True
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), local_rank=local,
                strategy="ddp" if strategy == "auto" else strategy, backend=backend, timeout_s=t, owns_group=owns,
                device=device)


_LOST_WORDS = ("connection", "closed", "reset by peer", "timed out", "timeout", "gloo", "nccl", "broken pipe",
               "peer", "socket", "store")


def is_lost_contact(e: BaseException) -> bool:
    """Whether ``e`` is a collective's failure (another process gone, or the timeout)."""
    dist_errors = tuple(getattr(torch.distributed, n) for n in ("DistError", "DistBackendError", "DistNetworkError")
                        if hasattr(torch.distributed, n))
    if isinstance(e, DistributedError):
        return False  # already said
    if dist_errors and isinstance(e, dist_errors):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _LOST_WORDS)


def lost_contact_message(d: Dist, what: str, e: BaseException) -> str:
    first = " ".join(str(e).split())[:160]
    return (f"process {d.rank} of {d.world} lost contact with the others while {what}: another process stopped "
            f"(its own message says why) or {d.timeout_s:.0f} s passed without an answer ({TIMEOUT_ENV} sets the "
            f"wait); cause: {type(e).__name__}: {first}")


@contextlib.contextmanager
def lost_contact(d: Dist, what: str):
    """Turn a failed collective inside the block into one :class:`DistributedError` line."""
    try:
        yield
    except Exception as e:
        if d.active and is_lost_contact(e):
            raise DistributedError(lost_contact_message(d, what, e)) from e
        raise


class NoMetrics:
    """The metrics log of a process other than rank 0: keeps nothing, writes nothing."""

    def __init__(self):
        self.rows: list = []
        self.sinks: list = []

    def write(self, row: dict) -> None:
        pass

    def sync(self) -> int:
        return 0

    def close(self) -> None:
        pass


def localize(d: Dist, precision):
    """``precision`` (a :class:`deltatune.train.precision.Precision`) on this process's GPU when the
    run is on CUDA with several processes; as it is otherwise."""
    if d.active and precision.device.type == "cuda":
        return dataclasses.replace(precision, device=d.device)
    return precision


def current_rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``; 0 where ``/proc`` is absent)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    if type(t).__name__ == "NF4Tensor":  # 4-bit codes and scales, not the dtype it reads as
        return sum(_local_bytes(getattr(t, k)) for k in ("quantized_data", "quantized_scalers", "quantization_factor",
                                                          "scaler_mean", "nf4") if isinstance(getattr(t, k, None), torch.Tensor))
    return t.numel() * t.element_size()


def held_bytes(model: nn.Module, optimizer=None) -> dict:
    """Bytes this process holds of the model's parameters (its shards under FSDP, NF4 weights counted as
    stored) and of the optimizer's state, measured from the tensors."""
    out = {"params": sum(_local_bytes(p) for p in model.parameters())}
    if optimizer is not None:
        out["optimizer"] = sum(_local_bytes(v) for st in optimizer.state.values() for v in st.values()
                               if isinstance(v, torch.Tensor))
    return out


def process_figures(d: Dist, model: Optional[nn.Module] = None, optimizer=None) -> dict:
    """Per-process memory, gathered on every process: ``peak_rss_bytes_per_process`` (list, rank order; the
    peak includes loading the whole base, which every process does before FSDP shards it),
    ``rss_bytes_at_end_per_process`` (what each holds after training), with ``model``
    ``param_bytes_per_process`` and ``optimizer_state_bytes_per_process`` (:func:`held_bytes`) and, on CUDA, ``peak_cuda_bytes_per_process`` (``torch.cuda.max_memory_allocated``)."""
    mine = {"rss": peak_rss_bytes(), "now": current_rss_bytes(),
            **(held_bytes(model, optimizer) if model is not None else {})}
    if d.device.type == "cuda":
        mine["cuda"] = int(torch.cuda.max_memory_allocated(d.device))
    allp = d.gather_object(mine)
    out = {"peak_rss_bytes_per_process": [p["rss"] for p in allp],
           "rss_bytes_at_end_per_process": [p["now"] for p in allp]}
    if "params" in mine:
        out["param_bytes_per_process"] = [p["params"] for p in allp]
        out["optimizer_state_bytes_per_process"] = [p.get("optimizer", 0) for p in allp]
    if "cuda" in mine:
        out["peak_cuda_bytes_per_process"] = [p["cuda"] for p in allp]
    return out


class SharedSaver:
    """A run's checkpoints on several processes: every process takes part (the adapter and the optimizer's
    state are gathered whole under FSDP, every process's RNG state is collected), rank 0 alone writes,
    through ``inner`` (its :class:`deltatune.train.checkpoint.Checkpointer`; None on the other processes,
    whose ``out`` is then None). A checkpoint holds whole tensors, so any number of processes resumes it."""

    def __init__(self, d: Dist, model: nn.Module, inner=None):
        self.d, self.model, self.inner = d, model, inner
        self.out = inner.out if inner is not None else None
        self.saved_step: Optional[int] = None

    def save(self, trainer) -> Optional[str]:
        with self.d.full_parameters(self.model):
            if self.inner is not None:
                path = self.inner.save(trainer)  # calls trainer.state_dict(): the collectives, as below
            else:
                trainer.state_dict()
                path = None
        self.saved_step = trainer.step
        return path

    @property
    def latest(self) -> Optional[str]:
        return self.inner.latest if self.inner is not None else None

    def kept(self) -> str:
        return self.inner.kept() if self.inner is not None else ""
