"""GGUF output for llama.cpp and Ollama: ``deltatune export --format gguf`` (the LoRA adapter as a
llama.cpp LoRA adapter GGUF) and ``deltatune merge --format gguf`` (the merged model as a GGUF model
file), each with an Ollama ``Modelfile`` beside it. The file formats are :mod:`deltatune.formats.gguf`.

Output files follow the rules of output folders (:mod:`deltatune.train.outputs`): an existing file is
replaced only with ``--overwrite``, and then only a GGUF file (it starts with the ``GGUF`` magic) or a
``Modelfile`` deltatune wrote (its first line says so); nothing is written before the adapter has been
read and checked.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ..config import load_config
from ..formats import gguf as gg
from ..formats.peft import read_adapter_tensors
from ..integrations.hf_trainer import drop_gguf_quantizer
from ..integrations.transformers import ModelSource, load_tokenizer, resolve_model
from ..lifecycle import merge_and_unload
from ..formats.peft import load_adapter
from .commands import _dequantize_rest, base_for_adapter, quantize_as_trained, to_stderr
from .config import UsageError
from .data import end_of_turn_ids
from .pipeline import load_base

MODELFILE = "Modelfile"
_MODELFILE_HEAD = "# Ollama Modelfile written by deltatune"


def check_file_out(path: str, overwrite: bool, kind: str = "--out") -> str:
    """Check that ``path`` may receive a new GGUF file or Modelfile; return it absolute (nothing written).

    Raises:
        UsageError: ``path`` is a folder; it exists and ``overwrite`` is False; it exists and is not a
            file deltatune may replace (a GGUF file, or a Modelfile deltatune wrote).
    """
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(p):
        raise UsageError(f"{kind} {p} is a folder: give a file name (e.g. {os.path.join(p, 'model.gguf')})")
    if os.path.exists(p):
        if not overwrite:
            raise UsageError(f"{kind} {p} exists: pass --overwrite or choose another file")
        with open(p, "rb") as fh:
            head = fh.read(len(_MODELFILE_HEAD))
        if not (head.startswith(b"GGUF") or head == _MODELFILE_HEAD.encode()):
            raise UsageError(f"{kind} {p} exists and is not a GGUF file or Modelfile deltatune wrote: it is never "
                             "replaced; choose another file")
    parent = os.path.dirname(p)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UsageError(f"{kind} {p} lies under the file {parent}: give a path in a folder")
    return p


def base_config(source: ModelSource) -> dict:
    """The base model's transformers config as a dict (from ``config.json`` or the GGUF's metadata)."""
    from transformers import AutoConfig

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoConfig.from_pretrained(source.folder, local_files_only=True, **kw).to_dict()


def _render(tok) -> Optional[Callable]:
    if not getattr(tok, "chat_template", None):
        return None
    return lambda messages, gen: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def modelfile_for(tok, from_: str, adapter: Optional[str] = None) -> str:
    """The Modelfile text for a model ``from_`` (+ ``adapter``) with the tokenizer's chat template,
    default system message and end-of-turn stop strings."""
    render = _render(tok)
    found = gg.ollama_template(render) if render else None
    template, system = found if found else (None, None)
    stops = [tok.convert_ids_to_tokens(i) for i in end_of_turn_ids(tok)]
    return gg.modelfile_text(from_, adapter=adapter, template=template, system=system,
                             stops=list(dict.fromkeys(s for s in stops if s)))


def _finish_modelfile(out: str, text: str, overwrite: bool) -> str:
    path = check_file_out(os.path.join(os.path.dirname(out), MODELFILE), overwrite, "the Modelfile")
    return gg.write_modelfile(path, text)


def run_export(adapter: str, out: str, model_path: Optional[str] = None, *, fmt: str = "gguf",
               gguf_type: str = "f32", overwrite: bool = False, log: Optional[Callable] = to_stderr) -> dict:
    """Write the LoRA adapter folder ``adapter`` as a llama.cpp LoRA adapter GGUF at ``out``, and an
    Ollama ``Modelfile`` beside it (``FROM`` the base model, ``ADAPTER`` ``out``, the chat template);
    return ``{"gguf", "modelfile", "tensors", "type"}``.

    Raises:
        UsageError: another ``fmt``; a missing adapter or base; an ``out`` that may not be written;
            an adapter llama.cpp cannot apply (not plain LoRA: the message says to merge instead), or
            a base architecture deltatune cannot name tensors for.
    """
    if fmt != "gguf":
        raise UsageError(f"--format must be gguf, got {fmt!r}")
    if gguf_type not in gg.GGUF_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(gg.GGUF_TYPES)}, got {gguf_type!r}")
    base = base_for_adapter(adapter, model_path)
    source = resolve_model(base)
    out = check_file_out(out, overwrite)
    check_file_out(os.path.join(os.path.dirname(out), MODELFILE), overwrite, "the Modelfile")
    cfg = load_config(adapter)
    try:
        gg.check_lora_exportable(cfg)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        summary = gg.write_lora_gguf(out, read_adapter_tensors(adapter), cfg, base_config(source),
                                     gguf_type=gguf_type, name=os.path.basename(os.path.abspath(adapter)))
    except gg.GGUFExportError as e:
        raise UsageError(str(e)) from None
    tok = load_tokenizer(source)
    modelfile = _finish_modelfile(out, modelfile_for(tok, source.display, adapter=out), overwrite)
    if log is not None:
        log(f"LoRA adapter GGUF written: {out} ({len(summary.tensors) // 2} adapted weights, {gguf_type}); "
            f"Ollama: {modelfile} (FROM {source.display})")
    return {"gguf": out, "modelfile": modelfile, "tensors": summary.tensors, "type": gguf_type}


def run_merge_gguf(adapter: str, out: str, model_path: Optional[str] = None, *, gguf_type: str = "f16",
                   overwrite: bool = False, log: Optional[Callable] = to_stderr) -> dict:
    """Merge the adapter into its base and write the result as a GGUF model file at ``out`` (weights in
    ``gguf_type``; norms float32), with the base GGUF's tokenizer metadata, and an Ollama ``Modelfile``
    beside it; return ``{"gguf", "modelfile", "tensors", "type"}``.

    The base is merged in float32 (a QLoRA adapter: on the 4-bit base it was trained on, as
    ``deltatune merge`` does).

    Raises:
        UsageError: an unknown type; a base that is not a GGUF file (its tokenizer metadata is copied
            from there: convert a folder base with llama.cpp's converter); an unsupported architecture;
            an ``out`` that may not be written.
    """
    if gguf_type not in gg.GGUF_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(gg.GGUF_TYPES)}, got {gguf_type!r}")
    base = base_for_adapter(adapter, model_path)
    source = resolve_model(base)
    if not source.gguf_file:
        raise UsageError(
            f"the merged GGUF needs llama.cpp's tokenizer metadata, which deltatune copies from a GGUF base, and the base "
            f"{source.display} is a transformers folder: write the merged folder (deltatune merge --out DIR) and convert "
            "it with llama.cpp's convert_hf_to_gguf.py, or pass --model FILE.gguf")
    out = check_file_out(out, overwrite)
    check_file_out(os.path.join(os.path.dirname(out), MODELFILE), overwrite, "the Modelfile")
    config_dict = base_config(source)
    try:
        gg.architecture(config_dict)
    except gg.GGUFExportError as e:
        raise UsageError(str(e)) from None
    model, tok, _ = load_base(base, "float32")
    quantized = quantize_as_trained(model, adapter, log)
    load_adapter(model, adapter)
    model = merge_and_unload(model)
    if quantized:
        _dequantize_rest(model)
    drop_gguf_quantizer(model)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with torch.no_grad():
        try:
            summary = gg.write_model_gguf(out, model.state_dict(), model.config.to_dict(), gguf_type=gguf_type,
                                          tokenizer=gg.tokenizer_fields(source.display),
                                          name=os.path.splitext(os.path.basename(out))[0])
        except gg.GGUFExportError as e:
            raise UsageError(str(e)) from None
    modelfile = _finish_modelfile(out, modelfile_for(tok, out), overwrite)
    if log is not None:
        log(f"merged model GGUF written: {out} ({gguf_type}, {os.path.getsize(out) / 2**20:,.0f} MiB); "
            f"Ollama: {modelfile}")
    return {"gguf": out, "modelfile": modelfile, "tensors": summary.tensors, "type": gguf_type}
