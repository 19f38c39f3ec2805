"""The inference subcommands as plain functions: ``run_eval``, ``run_generate``, ``run_merge``.

Each loads a base model and an adapter folder into it. An adapter trained on a 4-bit base
(``deltatune train --method qlora``) records that base's quantization in its weights file
(:data:`deltatune.formats.peft.BASE_QUANTIZATION_KEY`); the base is then quantized the same way
before the adapter is loaded, so that the adapter meets the base it was trained on, and one line
says so.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional

from .._io import remove_temporaries
from ..formats.peft import BASE_QUANTIZATION_KEY, load_adapter, read_adapter_metadata, read_config_json
from ..integrations.transformers import DEFAULT_MODEL_NAME
from ..layers import dense_weight, set_dense_weight
from ..lifecycle import merge_and_unload
from ..quant import is_quantized, quantize_base
from .config import TrainConfig, UsageError
from .data import ChatEncoder, end_of_turn_ids, has_chat_template, load_examples, pad_id_of
from .evaluate import Evaluator, evaluation_mode
from .full import drop_gguf_marks as _drop_gguf_marks
from .outputs import adopt_files, check_out, prepare_out, staging_dir, write_marker
from .pipeline import load_base, read_data, run_precision
from .sampling import check_sampling, generate_ids


def to_stderr(msg: str) -> None:
    """The default ``log`` of the commands: their stdout is the result (answers, JSON)."""
    print(msg, file=sys.stderr)


def base_for_adapter(adapter_dir: str, model_flag: Optional[str]) -> Optional[str]:
    """The ``--model`` to use with an adapter: the flag, else the adapter's recorded base when it exists
    on this machine, else None (the default model) when the recorded base is the default model.

    Raises:
        UsageError: the adapter folder is missing, or its base cannot be found here.
        ValueError: its ``adapter_config.json`` is not a JSON object.
    """
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        if os.path.isfile(os.path.join(adapter_dir, "config.json")):
            raise UsageError(f"--adapter {adapter_dir} is a model folder, not an adapter (no adapter_config.json; "
                             f"e.g. a --method full run): pass it as --model {adapter_dir}")
        raise UsageError(f"--adapter {adapter_dir} is not an adapter folder (no adapter_config.json)")
    base = read_config_json(adapter_dir).get("base_model_name_or_path")
    if model_flag:
        return model_flag
    if not isinstance(base, (str, type(None))):
        raise UsageError(f"--adapter {adapter_dir}: its base_model_name_or_path is {base!r}, not a path: pass --model PATH")
    if not base:
        return None
    if os.path.exists(base):
        return base
    if DEFAULT_MODEL_NAME.lower() in os.path.basename(str(base)).lower():
        return None
    raise UsageError(f"the adapter's base model {base} is not on this machine: pass --model PATH")


def quantize_as_trained(model, adapter: str, log: Optional[Callable] = to_stderr) -> Optional[dict]:
    """Quantize ``model`` (a dense base) as the base ``adapter`` was trained on, when its file records
    one; return the :func:`deltatune.quantize_base` arguments used (None: a dense base, left as it is)."""
    recorded = read_adapter_metadata(adapter).get(BASE_QUANTIZATION_KEY)
    if not recorded:
        return None
    kwargs = json.loads(recorded)
    quantize_base(model, **kwargs)
    if log is not None:
        details = f"{kwargs.get('backend')}" + (", double quant" if kwargs.get("double_quant") else "")
        log(f"base: 4-bit {kwargs.get('quant_type')} ({details}) as the adapter was trained")
    return kwargs


def load_with_adapter(adapter: Optional[str], model_path: Optional[str], dtype: str = "float32",
                      log: Optional[Callable] = to_stderr, device=None):
    """(model, tokenizer, source) with the adapter loaded for inference (or the bare base), on ``device``
    (default CPU); the base is quantized first when the adapter was trained on a 4-bit base
    (:func:`quantize_as_trained`)."""
    base = base_for_adapter(adapter, model_path) if adapter else model_path
    model, tok, source = load_base(base, dtype, device=device)
    if adapter:
        quantize_as_trained(model, adapter, log)
        load_adapter(model, adapter)
    model.eval()
    return model, tok, source


def run_eval(adapter: Optional[str], model_path: Optional[str], data: Optional[str], cfg: TrainConfig,
             log: Optional[Callable] = to_stderr) -> dict:
    """Metric (and eval loss) of model + adapter on ``data`` (all rows); without ``data``, on the held-out
    split that ``cfg`` describes: ``cfg.data``'s (as training split it; see :func:`run_settings`), or the
    default task's held-out words."""
    if data:
        examples = load_examples(data)
    else:
        if cfg.data and not os.path.isfile(cfg.data):
            raise UsageError(f"the adapter was trained on {cfg.data}, which is not here any more: pass --data FILE")
        examples = read_data(cfg)[1]
        if not examples:
            raise UsageError("the run had no held-out split: pass --data FILE")
        data = cfg.eval_data or (f"{cfg.data} (the run's held-out split)" if cfg.data else None)
    precision, dtype = run_precision(cfg)
    model, tok, source = load_with_adapter(adapter, model_path, dtype, log, precision.device)
    enc = ChatEncoder(tok, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on, truncation=cfg.truncation)
    ev = Evaluator(tok, examples, enc, size=cfg.eval_size or None, loss_size=cfg.eval_loss_size,
                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, precision=precision)
    res = ev(model)
    res.update({"adapter": adapter, "model": source.display, "data": data or "default task (held-out words)"})
    return res


def run_settings(adapter: Optional[str]) -> dict:
    """The data and precision options a training run recorded in ``adapter/report.json`` (empty when there
    is none), so that ``deltatune eval --adapter DIR`` (or ``--model DIR`` of a ``--method full`` run)
    scores the same held-out examples, computed the same way, as the run did (flags still win)."""
    p = os.path.join(adapter, "report.json") if adapter else ""
    if not p or not os.path.isfile(p):
        return {}
    try:
        with open(p, encoding="utf-8") as fh:
            conf = json.load(fh).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    keys = ("data", "eval_data", "val_fraction", "seed", "eval_size", "task_train_size", "task_wording", "max_seq_len",
            "train_on", "truncation", "precision", "dtype")
    return {k: conf[k] for k in keys if conf.get(k) is not None}


def run_generate(adapter: Optional[str], model_path: Optional[str], prompts: list[str], *,
                 max_new_tokens: int = 64, system: Optional[str] = None, batch_size: int = 16,
                 dtype: Optional[str] = None, device: Optional[str] = None, precision: str = "auto",
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                 log: Optional[Callable] = to_stderr) -> list[str]:
    """Answers to chat prompts (one user turn each), stopping at end of turn: greedy, or sampled with
    ``temperature`` > 0 and ``top_p`` (:mod:`deltatune.train.sampling`; ``seed`` for repeatable draws);
    on ``device`` in ``precision`` (:mod:`deltatune.train.precision`; the base in ``dtype``, default the
    precision's)."""
    check_sampling(temperature, top_p, max_new_tokens)
    prec, dtype = run_precision(TrainConfig(device=device, precision=precision, dtype=dtype))
    model, tok, source = load_with_adapter(adapter, model_path, dtype, log, prec.device)
    enc = ChatEncoder(tok)
    stops = end_of_turn_ids(tok)
    ids = []
    if has_chat_template(tok):
        for p in prompts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            ids.append(enc.prompt_ids(msgs))
    else:
        lead = (system + "\n\n") if system else ""
        ids = [list(tok(lead + p)["input_ids"]) for p in prompts]
        if log is not None:
            log(f"note: {source.display} has no chat template: each prompt is plain text: "
                + plain_prompt_format(tok, bool(system)))
    if not stops and log is not None:
        log("note: the tokenizer has no EOS and no end-of-turn token: answers run to --max-new-tokens")
    with evaluation_mode(model, prec):
        outs = generate_ids(model, ids, max_new_tokens=max_new_tokens, stop_ids=stops,
                            pad_id=pad_id_of(tok), batch_size=batch_size, temperature=temperature, top_p=top_p,
                            seed=seed)
    return [tok.decode(o, skip_special_tokens=True) for o in outs]


def plain_prompt_format(tok, with_system: bool) -> str:
    """How :func:`run_generate` lays out a prompt for a model without a chat template (for its note)."""
    probe = list(tok("x")["input_ids"])
    bare = list(tok("x", add_special_tokens=False)["input_ids"])
    k = len(probe) - len(bare)
    head = ", ".join(tok.convert_ids_to_tokens(probe[:k])) if k > 0 and probe[k:] == bare else ""
    parts = ([f"the tokenizer's {head}"] if head else []) + (["the --system text, a blank line"] if with_system
                                                            else []) + ["the prompt (no roles, no template)"]
    eos = getattr(tok, "eos_token", None)
    return ", then ".join(parts) + (f"; generation stops at EOS {eos}" if eos else "")


def run_merge(adapter: str, out: str, model_path: Optional[str] = None, *, overwrite: bool = False,
              dtype: str = "float32", log: Optional[Callable] = to_stderr) -> str:
    """Merge the adapter into its base and write a plain transformers model folder (safetensors + tokenizer).

    On a 4-bit base (a QLoRA adapter) the merged weights are ``dequant(W4) + delta``: the model the
    adapter was trained and evaluated as; 4-bit layers the adapter does not touch are written dequantized.

    The files are written into a temporary folder inside ``out`` and moved in when complete (each
    listed in the folder's marker first, with the usual permissions); a file of the user's there is
    never written over.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    base = base_for_adapter(adapter, model_path)
    a, o = os.path.realpath(adapter), os.path.realpath(os.path.expanduser(out))
    if a == o or a.startswith(o + os.sep):
        raise UsageError(f"--out {out} would replace the adapter folder {adapter}: choose another folder")
    check_out(out, overwrite, MERGE_FILES)  # nothing is deleted before the adapter has been loaded and merged
    model, tok, _ = load_base(base, dtype)
    quantized = quantize_as_trained(model, adapter, log)
    load_adapter(model, adapter)
    model = merge_and_unload(model)
    if quantized:
        _dequantize_rest(model)
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model, as transformers would load it
    _drop_gguf_marks(model)
    out = prepare_out(out, overwrite, "merge", MERGE_FILES)
    staging = staging_dir(out, "merge")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        adopt_files(out, staging)
    finally:
        remove_temporaries(out)
    write_marker(out, "merge", status="finished")
    return out


# the files of a merged model folder (the user's files of these names are never written over; a
# model or tokenizer with other files is checked again when they are moved in)
MERGE_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "vocab.json", "merges.txt", "added_tokens.json")


def _dequantize_rest(model) -> None:
    """Write the 4-bit layers a merge left (no adapter on them) as dense ``nn.Linear`` weights."""
    for _, m in list(model.named_modules()):
        if is_quantized(m):
            set_dense_weight(m, dense_weight(m))
