"""The inference subcommands as plain functions: ``run_eval``, ``run_generate``, ``run_merge``,
``run_combine``, ``run_extract``.

Each loads a base model and adapter folders into it. ``eval`` and ``generate`` take several adapters
(``{name: folder}``), each loaded under its name: a row that names one (the ``adapter`` field of a
data or prompts file) is answered by it, a row that names none by every loaded adapter, and rows of
different adapters share batches (mixed batches, :func:`deltatune.adapter_rows`).

An adapter trained on a 4-bit base (``deltatune train --method qlora``) records that base's
quantization in its weights file (:data:`deltatune.formats.peft.BASE_QUANTIZATION_KEY`); the base
is then quantized the same way before the adapter is loaded, so that the adapter meets the base it
was trained on, and one line says so.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional

import torch

from .._io import atomic_write_bytes, remove_temporaries
from ..adapters import BASE_ROW
from ..combine import COMBINATION_TYPES, add_weighted_adapter
from ..extract import extract_lora
from ..formats.peft import BASE_QUANTIZATION_KEY, load_adapter, read_adapter_metadata, read_config_json, save_adapter
from ..inject import get_config, validate_adapter_name
from ..integrations.transformers import DEFAULT_MODEL_NAME, load_model, load_tokenizer, resolve_model
from ..layers import dense_weight, set_dense_weight
from ..lifecycle import disable_adapter, merge_and_unload
from ..quant import is_quantized, quantize_base
from .config import TrainConfig, UsageError
from .data import ADAPTER_FIELD, ChatEncoder, end_of_turn_ids, has_chat_template, load_examples, pad_id_of
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
    return load_with_adapters({"default": adapter} if adapter else {}, model_path, dtype, log, device)


def named_adapters(adapter) -> dict:
    """``{name: folder}`` from ``--adapter`` values: None, a folder, or a list of ``NAME=DIR`` / ``DIR``
    (a bare folder is named "default"; it must then be the only one).

    Raises:
        UsageError: a bad or repeated name, or several bare folders.
    """
    if not adapter:
        return {}
    if isinstance(adapter, dict):
        return dict(adapter)
    values = [adapter] if isinstance(adapter, str) else list(adapter)
    out: dict = {}
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or os.path.isdir(v):
            name, folder = "default", v
        try:
            validate_adapter_name(name)
        except ValueError as e:
            raise UsageError(f"--adapter {v}: {e}") from None
        if name in out:
            raise UsageError(f"--adapter names {name!r} twice: give each adapter its own NAME=DIR"
                             if name != "default" else "several --adapter folders without names: give NAME=DIR each")
        out[name] = folder
    return out


def load_with_adapters(adapters: dict, model_path: Optional[str], dtype: str = "float32",
                       log: Optional[Callable] = to_stderr, device=None):
    """(model, tokenizer, source) with every adapter of ``adapters`` (name -> folder) loaded for
    inference under its name (the first one active), or the bare base; the base is quantized as the
    adapters were trained on (:func:`quantize_as_trained`).

    Raises:
        UsageError: a folder that is no adapter; adapters of different base models without ``--model``,
            or trained on differently quantized bases.
    """
    bases = {n: base_for_adapter(d, model_path) for n, d in adapters.items()}
    if len(set(bases.values())) > 1:
        raise UsageError(f"the adapters were trained on different base models ({bases}): pass --model PATH")
    quant = {n: read_adapter_metadata(d).get(BASE_QUANTIZATION_KEY) for n, d in adapters.items()}
    if len(set(quant.values())) > 1:
        raise UsageError(f"the adapters were trained on differently quantized bases ({quant}): load them separately")
    base = next(iter(bases.values())) if bases else model_path
    model, tok, source = load_base(base, dtype, device=device)
    if adapters:
        quantize_as_trained(model, next(iter(adapters.values())), log)
    for name, folder in adapters.items():
        load_adapter(model, folder, adapter_name=name)
    model.eval()
    return model, tok, source


def row_adapters(examples: list, names: list) -> tuple[list, Optional[list]]:
    """(rows, adapter per row): an example naming an adapter (``meta["adapter"]``) is one row for it;
    one naming none is a row for every adapter in ``names`` (or one row for the active adapter when
    at most one is loaded: adapter list None then, unless some example names one).

    Raises:
        UsageError: an example names an adapter that is not loaded.
    """
    chosen = [e.meta.get(ADAPTER_FIELD) if hasattr(e, "meta") else None for e in examples]
    if len(names) <= 1 and not any(chosen):
        return list(examples), None
    for i, c in enumerate(chosen):
        if c is not None and c not in names and c != BASE_ROW:
            raise UsageError(f"row {i + 1} asks for adapter {c!r}, which is not loaded (loaded: "
                             f"{', '.join(names) or 'none'}; {BASE_ROW!r} is the base model): add --adapter {c}=DIR")
    rows, per_row = [], []
    for e, c in zip(examples, chosen):
        for n in ([c] if c is not None else names or [BASE_ROW]):
            rows.append(e)
            per_row.append(n)
    return rows, per_row


def run_eval(adapter, model_path: Optional[str], data: Optional[str], cfg: TrainConfig,
             log: Optional[Callable] = to_stderr) -> dict:
    """Metric (and eval loss) of model + adapter on ``data`` (all rows); without ``data``, on the held-out
    split that ``cfg`` describes: ``cfg.data``'s (as training split it; see :func:`run_settings`), or the
    default task's held-out words. ``adapter``: a folder, or several (``{name: folder}`` or ``NAME=DIR``
    values): each row is scored with the adapter its ``adapter`` field names, else with every one
    (:func:`row_adapters`), in mixed batches; the result then has ``by_adapter``."""
    if data:
        examples = load_examples(data)
    else:
        if cfg.data and not os.path.isfile(cfg.data):
            raise UsageError(f"the adapter was trained on {cfg.data}, which is not here any more: pass --data FILE")
        examples = read_data(cfg)[1]
        if not examples:
            raise UsageError("the run had no held-out split: pass --data FILE")
        data = cfg.eval_data or (f"{cfg.data} (the run's held-out split)" if cfg.data else None)
    adapters = named_adapters(adapter)
    examples = examples[: cfg.eval_size] if cfg.eval_size else examples
    rows, names = row_adapters(examples, list(adapters))
    precision, dtype = run_precision(cfg)
    model, tok, source = load_with_adapters(adapters, model_path, dtype, log, precision.device)
    enc = ChatEncoder(tok, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on, truncation=cfg.truncation)
    ev = Evaluator(tok, rows, enc, loss_size=cfg.eval_loss_size, batch_size=cfg.eval_batch_size,
                   max_new_tokens=cfg.max_new_tokens, precision=precision, adapter_names=names)
    res = ev(model)
    shown = (next(iter(adapters.values())) if list(adapters) == ["default"] else adapters) if adapters else None
    res.update({"adapter": shown, "model": source.display, "data": data or "default task (held-out words)"})
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


def run_generate(adapter, model_path: Optional[str], prompts: list[str], *,
                 max_new_tokens: int = 64, system: Optional[str] = None, batch_size: int = 16,
                 dtype: Optional[str] = None, device: Optional[str] = None, precision: str = "auto",
                 temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                 choices: Optional[list] = None, log: Optional[Callable] = to_stderr) -> list:
    """Answers to chat prompts (one user turn each), stopping at end of turn: greedy, or sampled with
    ``temperature`` > 0 and ``top_p`` (:mod:`deltatune.train.sampling`; ``seed`` for repeatable draws);
    on ``device`` in ``precision`` (:mod:`deltatune.train.precision`; the base in ``dtype``, default the
    precision's).

    ``adapter``: None, a folder, or several (``{name: folder}`` or ``NAME=DIR`` values). With one
    adapter (or none) the answers are strings, one per prompt. With several, or with ``choices``
    (an adapter name or None per prompt), a prompt is answered by the adapter it names, else by every
    adapter, in mixed batches; the answers are then ``(adapter name, answer)`` pairs, in prompt order.
    """
    check_sampling(temperature, top_p, max_new_tokens)
    adapters = named_adapters(adapter)
    prec, dtype = run_precision(TrainConfig(device=device, precision=precision, dtype=dtype))
    model, tok, source = load_with_adapters(adapters, model_path, dtype, log, prec.device)
    enc = ChatEncoder(tok)
    stops = end_of_turn_ids(tok)
    per_prompt = [_Prompt(p, c) for p, c in zip(prompts, choices or [None] * len(prompts))]
    rows, names = row_adapters(per_prompt, list(adapters))
    templated = has_chat_template(tok)
    ids = []
    for r in rows:
        if templated:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": r.text}]
            ids.append(enc.prompt_ids(msgs))
        else:
            ids.append(list(tok(((system + "\n\n") if system else "") + r.text)["input_ids"]))
    if not templated and log is not None:
        log(f"note: {source.display} has no chat template: each prompt is plain text: "
            + plain_prompt_format(tok, bool(system)))
    if not stops and log is not None:
        log("note: the tokenizer has no EOS and no end-of-turn token: answers run to --max-new-tokens")
    with evaluation_mode(model, prec):
        outs = generate_ids(model, ids, max_new_tokens=max_new_tokens, stop_ids=stops,
                            pad_id=pad_id_of(tok), batch_size=batch_size, temperature=temperature, top_p=top_p,
                            seed=seed, adapter_names=names)
    answers = [tok.decode(o, skip_special_tokens=True) for o in outs]
    return answers if names is None else list(zip(names, answers))


class _Prompt:
    """A prompt and the adapter it asks for (``meta["adapter"]``, as a data row's)."""

    def __init__(self, text: str, choice: Optional[str]):
        self.text, self.meta = text, ({ADAPTER_FIELD: choice} if choice else {})


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
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # combine, extract: besides their record


def _dequantize_rest(model) -> None:
    """Write the 4-bit layers a merge left (no adapter on them) as dense ``nn.Linear`` weights."""
    for _, m in list(model.named_modules()):
        if is_quantized(m):
            set_dense_weight(m, dense_weight(m))


def run_combine(adapters, weights: list, out: str, combination_type: str = "svd", *,
                model_path: Optional[str] = None, svd_rank: Optional[int] = None, density: Optional[float] = None,
                majority_sign_method: str = "total", seed: int = 0, overwrite: bool = False,
                log: Optional[Callable] = to_stderr) -> dict:
    """Combine LoRA adapter folders (``{name: folder}`` or ``NAME=DIR`` values) with ``weights`` by
    :func:`deltatune.add_weighted_adapter` into a new adapter folder ``out`` (PEFT format, plus
    ``combine.json``: the sources, weights and options); return that record. DARE draws its masks from
    a generator seeded with ``seed``.

    Raises:
        UsageError: fewer adapters than weights (or the reverse), an unknown combination type, an
            existing ``--out`` (without ``--overwrite``); ValueError: what add_weighted_adapter refuses.
    """
    sources = named_adapters(adapters)
    if not sources:
        raise UsageError("give the adapters to combine: --adapter NAME=DIR (two or more, or one to rescale)")
    if len(weights) != len(sources):
        raise UsageError(f"--weights gives {len(weights)} numbers for {len(sources)} adapters: one weight each")
    if combination_type not in COMBINATION_TYPES:
        raise UsageError(f"--type {combination_type!r} is not one of {', '.join(COMBINATION_TYPES)}")
    name = "combined" if "combined" not in sources else "combined_"
    check_out(out, overwrite, ADAPTER_FILES)
    model, _, source = load_with_adapters(sources, model_path, "float32", log)
    add_weighted_adapter(model, list(sources), [float(w) for w in weights], name, combination_type,
                         svd_rank=svd_rank, density=density, majority_sign_method=majority_sign_method,
                         generator=torch.Generator().manual_seed(int(seed)))
    record = {"sources": sources, "weights": [float(w) for w in weights], "combination_type": combination_type,
              "svd_rank": svd_rank, "density": density, "majority_sign_method": majority_sign_method, "seed": seed,
              "model": source.display}
    cfg = get_config(model, name)
    cfg.base_model_name_or_path = cfg.base_model_name_or_path or source.display
    out = prepare_out(out, overwrite, "combine", ADAPTER_FILES + ("combine.json",))
    save_adapter(model, out, adapter_name=name)
    atomic_write_bytes(os.path.join(out, "combine.json"), (json.dumps(record, indent=1) + "\n").encode())
    write_marker(out, "combine", status="finished")
    return record


def run_extract(base: Optional[str], tuned: str, rank: int, out: str, *, target_modules=None,
                overwrite: bool = False, eval_size: int = 0, cfg: Optional[TrainConfig] = None,
                log: Optional[Callable] = to_stderr) -> dict:
    """``deltatune extract``: a LoRA adapter of rank ``rank`` from ``tuned - base``
    (:func:`deltatune.extract_lora`) into ``out`` (PEFT format, plus ``extract_report.json``: per layer
    the rank and the share of the difference's energy kept). ``eval_size`` > 0 also scores the
    default task's first ``eval_size`` held-out words with the tuned model and with base + adapter
    (exact match, greedy), written into the report. Returns the report.

    Raises:
        UsageError: a model folder that is not there, a rank below 1, an existing ``--out``;
            ValueError: models of different shapes, no difference.
    """
    if not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    check_out(out, overwrite, ADAPTER_FILES)
    base_source, tuned_source = resolve_model(base), resolve_model(tuned)  # fail fast on a missing folder
    model, tuned_model = load_model(base_source), load_model(tuned_source)
    report = extract_lora(model, tuned_model, rank, target_modules=target_modules or "all-linear").to_dict()
    report.update({"base": base_source.display, "tuned": tuned_source.display})
    if eval_size:
        cfg = cfg or TrainConfig()
        tok = load_tokenizer(base_source)
        examples = read_data(cfg)[1][:eval_size]
        enc = ChatEncoder(tok, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on)
        ev = Evaluator(tok, examples, enc, loss_size=cfg.eval_loss_size, batch_size=cfg.eval_batch_size,
                       max_new_tokens=cfg.max_new_tokens)
        report["eval"] = {"tuned": _scores(ev(tuned_model)), "extracted": _scores(ev(model))}
        with disable_adapter(model):
            report["eval"]["base"] = _scores(ev(model))
    get_config(model).base_model_name_or_path = base_source.display
    out = prepare_out(out, overwrite, "extract", ADAPTER_FILES + ("extract_report.json",))
    save_adapter(model, out)
    atomic_write_bytes(os.path.join(out, "extract_report.json"), (json.dumps(report, indent=1) + "\n").encode())
    write_marker(out, "extract", status="finished")
    return report


def _scores(res: dict) -> dict:
    return {k: res.get(k) for k in ("metric_name", "metric", "eval_loss", "n")}

