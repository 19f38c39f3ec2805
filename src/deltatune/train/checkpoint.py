"""Checkpoints of a training run, and resuming from them (``deltatune train --resume DIR``).

A checkpoint is a folder ``checkpoint-N`` beside the run's output (``--out``), after optimizer
step N; it holds only safetensors and JSON, so loading one runs no code:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter at step N (PEFT format, as
  :func:`deltatune.save_adapter` writes it; a second adapter goes to ``<name>/``);
* ``state.safetensors``: every tensor of :meth:`deltatune.train.loop.Trainer.state_dict` (the
  trainable parameters, AdamW's moments and step counts, the torch CPU/CUDA and Python RNG states);
* ``state.json``, written last: the rest of the trainer's state (step = windows of the plan done,
  the scheduler, the fp16 grad scaler, evaluations so far) and the run's (configuration, its
  fingerprint, the base model's scores, how many lines of ``metrics.jsonl`` the step had written).

The folder is filled under a temporary name and renamed to ``checkpoint-N`` when complete (every
file fsync'ed first), so a ``checkpoint-N`` folder is always whole; older ones beyond
``--keep-checkpoints`` are renamed away before they are deleted. Checkpoints are written every
``--save-every`` steps, after the last step, and when SIGINT or SIGTERM asks the run to stop; they
stay until the run finishes.

Resuming (:func:`find_resume`, then :func:`deltatune.train.pipeline.train_session` with it) takes
the last complete checkpoint, refuses one whose fingerprint (:data:`FINGERPRINT_FIELDS`, the
resolved precision and batching, hashes of the training and held-out examples) differs from the
run's, naming the field, and continues: the plan of windows is deterministic, so the run replays
nothing and skips nothing, and ends with the adapter the uninterrupted run ends with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._io import TMP_PREFIX, fsync_dir, remove_temporaries, remove_tree, write_new_file
from ..formats.peft import save_adapter
from .config import TrainConfig, UsageError, build_config
from .loop import NonFiniteLoss, TrainingInterrupted
from .outputs import CHECKPOINT_RE, checkpoint_names, read_marker, record_files, write_marker

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"  # written last: its presence makes a checkpoint folder complete
FORMAT = 1

# options that change what the run computes (besides the resolved precision, dtype and batching and
# the training/held-out examples, which the fingerprint holds too); the others (out, threads,
# device, eval_every, save_every, keep_checkpoints, eval_batch_size, plot, progress, the data
# paths when their content is the same ...) may differ when a run is resumed
FINGERPRINT_FIELDS = (
    "model", "method", "r", "lora_alpha", "lora_dropout", "target_modules", "method_options", "lr", "weight_decay",
    "warmup_steps", "schedule", "max_grad_norm", "batch_size", "grad_accum", "epochs", "max_steps", "seed",
    "max_seq_len", "train_on", "eval_size", "eval_loss_size", "max_new_tokens", "ppl_size",
)
_FLAG = {"r": "--rank", "method_options": "--method-opt"}


# ----------------------------------------------------------------------------- nested state <-> (JSON, tensors)


def flatten_state(obj, tensors: Optional[dict] = None, path: str = "s") -> tuple:
    """(JSON-able value, {key: tensor}) of a nested state of dicts, lists, tuples, numbers, strings
    and tensors. Tensors become ``{"__tensor__": key}``, tuples ``{"__tuple__": [...]}``, dicts whose
    keys are not all strings ``{"__items__": [[k, v], ...]}``; :func:`unflatten_state` undoes it."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: flatten_state(v, tensors, f"{path}.{k}")[0] for k, v in obj.items()}, tensors
        return {"__items__": [[flatten_state(k, tensors, f"{path}.k{i}")[0], flatten_state(v, tensors, f"{path}.{i}")[0]]
                              for i, (k, v) in enumerate(obj.items())]}, tensors
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{path}.{i}")[0] for i, v in enumerate(obj)]}, tensors
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{path}.{i}")[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path})")


def unflatten_state(obj, tensors: dict):
    """The nested state that :func:`flatten_state` gave ``obj`` and ``tensors`` for."""
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- fingerprint


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def items_digest(items) -> str:
    """Hash of encoded training items (token ids and labels, in order)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([list(it["input_ids"]), list(it["labels"])], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def examples_digest(examples) -> str:
    """Hash of the held-out examples (conversations, texts, accepted answers)."""
    return _digest([[e.messages, e.text, e.answers] for e in examples or []])


def fingerprint(cfg: TrainConfig, *, precision: str, dtype: str, items, eval_examples, model) -> dict:
    """What decides a run's arithmetic (and the scores of its report): the :data:`FINGERPRINT_FIELDS`
    of ``cfg``, the resolved ``precision`` and base ``dtype``, the training and held-out examples
    (hashed, with their number), the trainable tensors' names and shapes (hashed)."""
    d = cfg.to_dict()
    fp = {k: d[k] for k in FINGERPRINT_FIELDS}
    trainable = [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters() if p.requires_grad]
    fp.update({"precision": precision, "dtype": dtype, "train_examples": len(items), "train_data": items_digest(items),
               "eval_examples": len(eval_examples or []), "eval_data": examples_digest(eval_examples),
               "trainable": _digest(trainable)})
    return json.loads(json.dumps(fp))  # as it reads back from state.json


def fingerprint_difference(saved: dict, now: dict) -> Optional[str]:
    """The first field where two fingerprints differ, as a phrase for the error (None: the same run)."""
    for key in now:
        a, b = saved.get(key), now[key]
        if a == b:
            continue
        if key in ("train_data", "train_examples"):
            return (f"the training data differs from the checkpoint's ({saved.get('train_examples')} examples, hash "
                    f"{saved.get('train_data')}; here {now['train_examples']} examples, hash {now['train_data']}): "
                    "resume with the data the run was started with")
        if key in ("eval_data", "eval_examples"):
            return (f"the held-out data differs from the checkpoint's ({saved.get('eval_examples')} examples, hash "
                    f"{saved.get('eval_data')}; here {now['eval_examples']}, hash {now['eval_data']}): resume with the "
                    "data (and --eval-data, --val-fraction) the run was started with")
        if key == "batch_size":  # the combined batch: --batch-size x the number of processes (torchrun)
            return (f"--batch-size is {a!r} in the checkpoint but {b!r} here (counted over all processes: --batch-size x "
                    f"processes): pass a --batch-size that times this run's number of processes makes {a!r}")
        if key == "trainable":
            return "the adapter's tensors differ from the checkpoint's (another model or method): resume with the run's own"
        flag = _FLAG.get(key, "--" + key.replace("_", "-"))
        return f"{flag} is {a!r} in the checkpoint but {b!r} here: leave it out (or pass the checkpoint's value)"
    return None


# ----------------------------------------------------------------------------- writing and reading


def complete_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint in ``out``, by step."""
    found = []
    for name in checkpoint_names(out):
        d = os.path.join(out, name)
        if os.path.isfile(os.path.join(d, STATE_JSON)):
            found.append((int(CHECKPOINT_RE.fullmatch(name).group(1)), d))
    return found


class Checkpointer:
    """Writes checkpoints of a run into ``out`` and keeps the last ``keep``.

    ``meta``: a function returning the run's part of ``state.json`` (JSON-able), asked at each save.
    ``save_weights(model, folder)``: what a checkpoint holds beside the trainer's state (default: the
    adapter in the PEFT format; ``--method full``: the model folder).
    """

    def __init__(self, out: str, model, meta: Callable[[], dict], keep: int = 1,
                 save_weights: Optional[Callable] = None):
        self.out, self.model, self.meta, self.keep = out, model, meta, max(1, int(keep))
        self.save_weights = save_weights or save_adapter
        self.saved_step: Optional[int] = None

    @property
    def latest(self) -> Optional[str]:
        found = complete_checkpoints(self.out)
        return found[-1][1] if found else None

    def save(self, trainer) -> str:
        """Write ``checkpoint-<trainer.step>`` (complete when it appears), then delete the oldest beyond
        ``keep``; return its folder."""
        step = trainer.step
        name = f"checkpoint-{step}"
        final = os.path.join(self.out, name)
        tmp = os.path.join(self.out, f"{TMP_PREFIX}{name}-{os.getpid()}")
        if os.path.isdir(tmp):
            remove_tree(tmp)
        os.makedirs(tmp)
        try:
            self._fill(tmp, trainer)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # a write that failed (a full disk) leaves nothing behind
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror or str(e), final) from None
            raise
        record_files(self.out, add=[name])  # listed as deltatune's before it appears
        if os.path.isdir(final):
            remove_tree(final)
        os.replace(tmp, final)
        fsync_dir(self.out)
        self.saved_step = step
        others = [d for s, d in complete_checkpoints(self.out) if s != step]
        old = others[: max(0, len(others) - (self.keep - 1))]
        old += [os.path.join(self.out, n) for n in checkpoint_names(self.out)
                if not os.path.isfile(os.path.join(self.out, n, STATE_JSON))]  # a version without state.json
        for d in old:
            remove_tree(d)
        if old:
            record_files(self.out, remove=[os.path.basename(d) for d in old])
        return final

    def _fill(self, folder: str, trainer) -> None:
        from safetensors.torch import save as st_save

        self.save_weights(self.model, folder)
        json_state, tensors = flatten_state(trainer.state_dict())
        write_new_file(os.path.join(folder, STATE_TENSORS), st_save(tensors, metadata={"format": "pt"}))
        body = {"format": FORMAT, "step": trainer.step, "trainer": json_state, "run": self.meta()}
        write_new_file(os.path.join(folder, STATE_JSON), (json.dumps(body, indent=1) + "\n").encode())
        fsync_dir(folder)

    def kept(self) -> str:
        """Where the run can be resumed from, as a phrase for a message."""
        latest = self.latest
        how = f"resume with: deltatune train --resume {self.out}"
        return f"the last complete checkpoint is {latest}: {how}" if latest else f"no checkpoint was saved yet; {how}"

    def remove_all(self) -> None:
        """Delete every checkpoint (the run finished) and deltatune's temporary entries."""
        names = checkpoint_names(self.out)
        for n in names:
            remove_tree(os.path.join(self.out, n))
        remove_temporaries(self.out)
        if names:
            record_files(self.out, remove=names)


def read_checkpoint(folder: str) -> tuple[dict, dict]:
    """(trainer state for :meth:`Trainer.load_state_dict`, the run's part) of a checkpoint folder.

    Raises:
        UsageError: the folder is damaged (names the file and the fix).
    """
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, STATE_JSON), encoding="utf-8") as fh:
            body = json.load(fh)
        tensors = load_file(os.path.join(folder, STATE_TENSORS))
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"{STATE_JSON} is not a deltatune checkpoint of format {FORMAT}")
        state = unflatten_state(body["trainer"], tensors)
        run = body["run"]
        if not isinstance(state, dict) or not isinstance(run, dict):
            raise ValueError(f"{STATE_JSON} has no trainer or run state")
    except Exception as e:  # noqa: BLE001 - any damage is the same message
        detail = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"checkpoint {folder} is damaged ({detail}): delete it to resume from the one before, "
                         "or start the run again") from None
    return state, run


# ----------------------------------------------------------------------------- resuming


class NothingToResume(Exception):
    """``--resume`` of a run that finished (the message says so; not an error)."""


@dataclass
class Resume:
    """What ``--resume DIR`` continues: the run folder, its last complete checkpoint (None: there is
    none yet, the run starts again from step 0 with its recorded configuration), the trainer and
    run state read from it, and the run's recorded configuration."""

    out: str
    checkpoint: Optional[str]
    state: Optional[dict]
    run: dict
    config: dict


def find_resume(path: str) -> Resume:
    """The run ``deltatune train --resume path`` continues.

    Raises:
        UsageError: ``path`` is not the output folder of a deltatune training run (one line, with the fix).
        NothingToResume: the run there finished.
    """
    out = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(out):
        raise UsageError(f"--resume {path}: no such folder: give the --out folder of the run to continue")
    body = read_marker(out)
    if body is None or body.get("command") != "train":
        what = f"a {body.get('command')} output" if body else "not the output folder of a deltatune training run"
        raise UsageError(f"--resume {path} is {what}: give the --out folder of the training run to continue")
    if body.get("status") == "finished" or (body.get("status") is None and os.path.isfile(os.path.join(out, "report.json"))):
        raise NothingToResume(f"deltatune: {out} holds a finished run (report.json): nothing to resume")
    found = complete_checkpoints(out)
    if found:
        state, run = read_checkpoint(found[-1][1])
        return Resume(out, found[-1][1], state, run, dict(run.get("config") or {}))
    config = body.get("config")
    if not isinstance(config, dict):
        raise UsageError(f"--resume {path}: the run left no checkpoint and no recorded configuration: start it again "
                         "with --overwrite")
    return Resume(out, None, None, {}, dict(config))


def resume_config(resume: Resume, yaml_values: Optional[dict] = None, flag_values: Optional[dict] = None) -> TrainConfig:
    """The configuration of the resumed run: the recorded one, then ``yaml_values``, then ``flag_values``
    (both as given to :func:`deltatune.train.config.build_config`); ``out`` is the run folder.

    Raises:
        UsageError: ``--out`` names another folder, or ``--overwrite`` is given.
    """
    flags = {k: v for k, v in (flag_values or {}).items() if v is not None}
    if flags.get("overwrite"):
        raise UsageError(f"--resume continues the run in {resume.out}; --overwrite would start it over: pass one of them")
    out = flags.pop("out", None)
    if out is not None and os.path.abspath(os.path.expanduser(out)) != resume.out:
        raise UsageError(f"--out {out} is not the folder being resumed ({resume.out}): leave --out out")
    defaults = TrainConfig().to_dict()
    recorded = {k: v for k, v in resume.config.items()
                if k in defaults and k not in ("out", "overwrite", "strategy") and v != defaults[k]}  # strategy: the launch's
    method_options = {**(recorded.pop("method_options", None) or {}), **((yaml_values or {}).get("method_options") or {})}
    layered = {**recorded, **{k: v for k, v in (yaml_values or {}).items() if k != "method_options"}}
    if method_options:
        layered["method_options"] = method_options
    cfg = build_config(layered, flags)
    cfg.out = resume.out
    return cfg


def check_resumable(resume: Resume, now: dict, batching_modes: tuple) -> None:
    """Refuse (one line, naming the field) a checkpoint of another configuration or data set.

    ``now``: the run's :func:`fingerprint`; ``batching_modes``: its ``packing`` and ``shared_prefix``
    options (``on``/``off`` must agree with what the checkpoint's run used; ``auto`` takes it).
    """
    diff = fingerprint_difference(resume.run.get("fingerprint") or {}, now)
    if diff is None:
        for flag, mode, used in zip(("--packing", "--shared-prefix"), batching_modes, resume.run.get("batching") or ()):
            if mode in ("on", "off") and (mode == "on") != bool(used):
                diff = (f"{flag} is {'on' if used else 'off'} in the checkpoint but {mode} here: leave it out (or "
                        f"pass {'on' if used else 'off'})")
                break
    if diff is not None:
        raise UsageError(f"cannot resume {resume.checkpoint}: {diff}; or start a new run with another --out")


# ----------------------------------------------------------------------------- stopping on a signal


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop after the current step (``requested`` is then
    the signal number), saying so on stdout (stderr keeps the one line the command ends with); a second one acts at once (KeyboardInterrupt / exit).
    Only in the main thread; elsewhere nothing is installed."""

    def __init__(self, say: bool = True):
        self.say = say
        self.requested: Optional[int] = None
        self._old: dict = {}

    def is_set(self) -> bool:
        return self.requested is not None

    def _handler(self, signum, frame):
        self.requested = signum
        for s, old in self._old.items():
            signal.signal(s, old if s == signal.SIGINT else signal.SIG_DFL)
        if self.say:  # os.write: a print here could meet the main thread inside a print (reentrant call)
            msg = (f"\ndeltatune: {signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                   "(send it again to stop at once)\n")
            with contextlib.suppress(OSError):
                os.write(1, msg.encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            with contextlib.suppress(Exception):
                signal.signal(s, old)
        self._old = {}
        return False


def run_fit(trainer, saver: Checkpointer, final: bool = True) -> None:
    """``trainer.fit()`` with its checkpoints: SIGINT/SIGTERM stop the run after the current step, with
    a checkpoint; ``final``: a checkpoint after the last step too (a crash while the run finishes
    then loses no step). A second signal stops at once, and a diverging step stops the run; the
    message of each says which checkpoint is kept and how to resume.

    Raises:
        TrainingInterrupted: a signal stopped the run (the message is the one line to show).
        NonFiniteLoss: a step's loss or gradient was not finite (the step was not taken).
    """
    with StopSignals() as stop:
        trainer.stop_requested = stop.is_set
        try:
            try:
                trainer.fit()
            except TrainingInterrupted as e:  # (another process's signal, under torchrun)
                stop.requested = stop.requested or e.signum
            if (final or stop.requested) and saver.saved_step != trainer.step:
                saver.save(trainer)
        except KeyboardInterrupt:  # a second SIGINT, in the middle of a step or a checkpoint
            raise TrainingInterrupted(trainer.step, f"deltatune: interrupted during step {trainer.step + 1} of "
                                      f"{trainer.total_steps}; {saver.kept()}", signal.SIGINT) from None
        except NonFiniteLoss as e:
            if saver.out is not None:  # (None: a process other than rank 0, which writes nothing)
                write_marker(saver.out, "train", status="diverged")
            latest = saver.latest
            raise NonFiniteLoss(f"{e}; " + (f"the last good checkpoint, {latest}, is kept" if latest else
                                            "no checkpoint had been saved")) from None
        finally:
            trainer.stop_requested = None
    if stop.requested:
        name = signal.Signals(stop.requested).name
        raise TrainingInterrupted(trainer.step, f"deltatune: interrupted by {name} after step {trainer.step} of "
                                  f"{trainer.total_steps}; checkpoint saved in {saver.latest}: resume with: deltatune "
                                  f"train --resume {saver.out}", stop.requested)
