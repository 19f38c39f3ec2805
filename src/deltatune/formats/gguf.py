"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package (llama.cpp's own gguf-py).

Two kinds of file:

* **A LoRA adapter GGUF** (:func:`write_lora_gguf`), as llama.cpp's ``convert_lora_to_gguf.py``
  writes it: metadata ``general.architecture`` (the base's), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32), ``general.name``,
  ``general.quantization_version``; per adapted weight two tensors named after the base tensor's GGUF
  name, ``blk.N.attn_q.weight.lora_a`` (PEFT's ``lora_A``, (r, in)) and ``.lora_b`` (PEFT's
  ``lora_B``, (out, r)): stored as numpy (rows, cols), which ggml reads as ``ne = [cols, rows]``, the
  layout llama.cpp checks (``a.ne[0] == in``, ``b.ne[1] == out``, ``a.ne[1] == b.ne[0] == r``).
  On llama-architecture bases the rows of ``lora_b`` of ``attn_q`` / ``attn_k`` are permuted as the
  converter permutes those base weights for llama.cpp's RoPE layout (:func:`llama_permute`); an
  embedding LoRA becomes ``token_embd.weight.lora_a`` = ``lora_embedding_A``\\ :sup:`T` (vocab, r) and
  ``.lora_b`` = ``lora_embedding_B`` (dim, r). llama.cpp scales each pair by ``alpha / rank`` (rank =
  that pair's r); where deltatune's scaling differs (rsLoRA, ``alpha_pattern``, ``rank_pattern``) the
  difference is folded into ``lora_b``, so every layer gets the scaling it was trained with.
* **A model GGUF** (:func:`write_model_gguf`), e.g. of a merged model: the architecture's metadata
  (``<arch>.block_count``, ``context_length``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count``, ``attention.head_count_kv``, ``attention.layer_norm_rms_epsilon``,
  ``rope.freq_base``, ``rope.dimension_count``, ``vocab_size``, ``general.file_type``), the
  tokenizer's metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``: copied from a GGUF file,
  :func:`tokenizer_fields`), and the weights under their GGUF names, q/k permuted for llama.

Tensor types follow the converter: 1-D tensors and norms are float32; every other weight (and every
``lora_a``/``lora_b``) takes the requested type, ``f32``, ``f16``, ``bf16`` or ``q8_0``; a tensor whose
rows Q8_0 cannot split into blocks of 32 falls back to ``f16`` (as the converter does).

Supported architectures (transformers ``model_type`` -> GGUF): ``llama`` and ``mistral`` -> ``llama``
(q/k permuted), ``qwen2`` -> ``qwen2``. Also here: an Ollama ``Modelfile`` (:func:`modelfile_text`)
with the chat template turned into Ollama's Go template (:func:`ollama_template`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .._io import atomic_write_bytes
from ..config import AdapterConfig
from ..methods.lora import LoraConfig, pattern_value

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# transformers model_type -> (GGUF architecture name, whether q/k rows are permuted for llama.cpp's RoPE)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_[AB])$")


class GGUFExportError(ValueError):
    """The adapter or model cannot be written as GGUF; the message names the reason and the way out."""


@dataclass
class GGUFSummary:
    """What a writer wrote: the path, the GGUF architecture, and per tensor its GGUF name, shape (numpy
    order: rows first) and type name."""

    path: str
    architecture: str
    tensors: list = field(default_factory=list)  # (name, shape, type)
    metadata: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- architecture and names


def _hp(config: dict, *names, default=None):
    for n in names:
        v = config.get(n)
        if v is not None:
            return v
    return default


def architecture(config: dict) -> tuple[str, bool]:
    """(GGUF architecture name, q/k permuted) of a transformers config dict.

    Raises:
        GGUFExportError: an architecture deltatune cannot write (the supported ones are listed).
    """
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports model types {', '.join(sorted(ARCHITECTURES))}; this model is {mt!r}. Write the "
            "merged model as a transformers folder (deltatune merge --out DIR) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py")
    return ARCHITECTURES[mt]


def _sizes(config: dict) -> dict:
    n_head = int(_hp(config, "num_attention_heads"))
    hidden = int(_hp(config, "hidden_size"))
    return {"n_layers": int(_hp(config, "num_hidden_layers")), "n_head": n_head,
            "n_head_kv": int(_hp(config, "num_key_value_heads", default=n_head)), "hidden": hidden,
            "head_dim": int(_hp(config, "head_dim", default=hidden // n_head))}


def _name_map(arch: str, n_layers: int):
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_enum, n_layers)


def gguf_tensor_name(name_map, hf_name: str) -> str:
    """The GGUF name of a transformers parameter (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``).

    Raises:
        GGUFExportError: the parameter has no GGUF name in this architecture.
    """
    out = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise GGUFExportError(f"no GGUF tensor name for {hf_name!r} in this architecture (llama.cpp would not load it)")
    return out


def llama_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows (dim 0) of a q or k projection (or bias, or LoRA B) from transformers' RoPE
    layout (two halves per head) to llama.cpp's (interleaved pairs), as ``convert_hf_to_gguf.py``
    does; ``n_heads`` is the number of query heads for q and of key/value heads for k."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _permute_heads(gguf_name: str, permute: bool, sizes: dict) -> Optional[int]:
    if not permute:
        return None
    if ".attn_q." in gguf_name:
        return sizes["n_head"]
    if ".attn_k." in gguf_name:
        return sizes["n_head_kv"]
    return None


def _qtype(type_name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[type_name]


def _check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def tensor_type_for(gguf_name: str, ndim: int, gguf_type: str) -> str:
    """The type the converter gives a tensor: float32 for 1-D tensors, norms and names that are not
    weights; the requested type otherwise."""
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return "f32"
    return gguf_type


def encode_tensor(arr: np.ndarray, type_name: str) -> tuple[np.ndarray, str]:
    """(data for ``GGUFWriter.add_tensor``, type name) of a float32 array; Q8_0 falls back to f16 when
    the rows do not split into blocks of 32 (the converter's rule)."""
    import gguf

    try:
        return gguf.quants.quantize(arr, _qtype(type_name)), type_name
    except gguf.QuantError:
        return gguf.quants.quantize(arr, _qtype("f16")), "f16"


def roundtrip(t: torch.Tensor, type_name: str) -> torch.Tensor:
    """``t`` (float) stored as ``type_name`` and read back, in float32: what a reader of the file gets
    (the quantization's own error; used by tests and checks)."""
    import gguf

    arr = t.detach().float().cpu().numpy()
    data, used = encode_tensor(arr, type_name)
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, _qtype(used))).reshape(arr.shape))


class _Writer:
    """A GGUFWriter that records what it writes and writes the file atomically."""

    def __init__(self, path: str, arch: str):
        import gguf

        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.w = gguf.GGUFWriter(self.tmp, arch)
        self.summary = GGUFSummary(path=path, architecture=arch)

    def tensor(self, name: str, t: torch.Tensor, type_name: str) -> None:
        arr = t.detach().to(torch.float32).cpu().contiguous().numpy()
        data, used = encode_tensor(arr, type_name)
        self.w.add_tensor(name, data, raw_dtype=_qtype(used))
        self.summary.tensors.append((name, tuple(arr.shape), used))

    def finish(self) -> GGUFSummary:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file(progress=False)
        self.w.close()
        os.replace(self.tmp, self.path)
        return self.summary

    def abort(self) -> None:
        try:
            self.w.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


# ----------------------------------------------------------------------------- LoRA adapter


def _lora_pairs(tensors: dict) -> dict:
    """module path -> {"A": tensor, "B": tensor, "embedding": bool} of a PEFT LoRA file.

    Raises:
        GGUFExportError: a tensor that is not a LoRA A/B matrix (saved embeddings, modules_to_save
            copies, trained biases, DoRA magnitudes), or an A without its B.
    """
    pairs: dict = {}
    for key, t in tensors.items():
        rest = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA_KEY.match(rest)
        if m is None:
            what = ("a DoRA magnitude" if "lora_magnitude" in rest else
                    "a full weight (saved embeddings or a modules_to_save copy)" if rest.endswith("weight") else
                    "a trained bias" if rest.endswith("bias") else "not a LoRA matrix")
            raise GGUFExportError(
                f"the adapter holds {rest!r} ({what}), which a llama.cpp LoRA adapter cannot carry: merge the adapter "
                "into the model instead (deltatune merge --adapter DIR --format gguf --out FILE)")
        module = m.group("module") or m.group("emodule")
        kind = (m.group("kind") or m.group("ekind"))[-1]
        entry = pairs.setdefault(module, {"embedding": m.group("emodule") is not None})
        entry[kind] = t
    for module, e in pairs.items():
        if "A" not in e or "B" not in e:
            raise GGUFExportError(f"the adapter file has lora_{'B' if 'A' in e else 'A'} of {module} but not its pair")
    return pairs


def check_lora_exportable(config: AdapterConfig) -> LoraConfig:
    """The config, when llama.cpp can apply it as a LoRA adapter.

    Raises:
        GGUFExportError: another method, DoRA, PiSSA/OLoRA residual bases, trained biases,
            ``modules_to_save`` or ``lora_bias`` (the message says to merge instead).
    """
    merge_hint = "merge it into the model instead (deltatune merge --adapter DIR --format gguf --out FILE)"
    if not isinstance(config, LoraConfig):
        hint = merge_hint if config.merge_error is None else f"it cannot be merged either ({config.merge_error})"
        raise GGUFExportError(f"a llama.cpp adapter GGUF holds LoRA only; this adapter is {config.peft_type}: {hint}")
    reasons = []
    if config.use_dora:
        reasons.append("DoRA (llama.cpp applies plain LoRA only)")
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora")):
        reasons.append(f"{config.init_lora_weights} (it was trained on a residual base weight, not the base's)")
    if config.bias != "none":
        reasons.append(f"bias={config.bias!r} (trained base biases)")
    if config.modules_to_save:
        reasons.append("modules_to_save (full module copies)")
    if config.lora_bias:
        reasons.append("lora_bias")
    if reasons:
        raise GGUFExportError(f"this LoRA adapter uses {', '.join(reasons)}, which a llama.cpp LoRA adapter cannot "
                              f"express: {merge_hint}")
    return config


def write_lora_gguf(path: str, tensors: dict, config: AdapterConfig, base_config: dict, *,
                    gguf_type: str = "f32", name: Optional[str] = None) -> GGUFSummary:
    """Write a PEFT LoRA adapter (its file's ``tensors`` and ``config``) as a llama.cpp LoRA adapter GGUF.

    Args:
        tensors: PEFT file keys -> tensors (``base_model.model.<module>.lora_A.weight`` (r, in), ``lora_B``
            (out, r); embeddings ``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r)).
        base_config: the base model's transformers config as a dict (``model_type``, sizes, tying).
        gguf_type: ``f32`` (the converter's default), ``f16``, ``bf16`` or ``q8_0``.

    Returns:
        A :class:`GGUFSummary` (tensor shapes in numpy order: ``lora_a`` (r, in), ``lora_b`` (out, r)).

    Raises:
        GGUFExportError: the adapter is not plain LoRA (:func:`check_lora_exportable`), holds other
            tensors, targets a module llama.cpp has no tensor for (or the output head of a model whose
            head is tied to the embedding), or the architecture is not supported.
    """
    _check_type(gguf_type)
    cfg = check_lora_exportable(config)
    arch, permute = architecture(base_config)
    sizes = _sizes(base_config)
    name_map = _name_map(arch, sizes["n_layers"])
    tied = bool(base_config.get("tie_word_embeddings", False))
    alpha = float(cfg.lora_alpha)
    out = []
    for module, e in _lora_pairs(tensors).items():
        a, b = e["A"].float(), e["B"].float()
        r = a.shape[0]
        if b.shape[-1] != r:
            raise GGUFExportError(f"{module}: lora_A has rank {r} but lora_B has {b.shape[-1]} columns")
        if module.split(".")[-1] == "lm_head" and tied:
            raise GGUFExportError("the adapter changes lm_head, but the base ties it to the input embedding (llama.cpp "
                                  "has no separate output weight then): merge instead (deltatune merge --format gguf)")
        gname = gguf_tensor_name(name_map, module + ".weight")
        a_l = float(pattern_value(cfg.alpha_pattern, module, cfg.lora_alpha))
        factor = (a_l * math.sqrt(r) if cfg.use_rslora else a_l) / alpha  # llama.cpp computes alpha / r
        if factor != 1.0:
            b = b * factor
        if e["embedding"]:
            if gname != "token_embd.weight":
                raise GGUFExportError(f"an embedding LoRA on {module} has no llama.cpp counterpart")
            a = a.T.contiguous()  # llama.cpp reads token_embd's pair flipped (see llm_build_inp_embd)
        else:
            heads = _permute_heads(gname, permute, sizes)
            if heads is not None:
                b = llama_permute(b, heads)
        block = next((int(p) for p in gname.split(".") if p.isdecimal()), -1)
        out.append((block, gname, a, b))
    if not out:
        raise GGUFExportError("the adapter file holds no LoRA matrices")
    w = _Writer(path, arch)
    try:
        w.w.add_type("adapter")
        w.w.add_string("adapter.type", "lora")
        w.w.add_name(name or os.path.splitext(os.path.basename(path))[0])
        w.w.add_float32("adapter.lora.alpha", alpha)
        w.w.add_quantization_version(_quant_version())
        for _, gname, a, b in sorted(out, key=lambda x: (x[0], x[1])):
            w.tensor(gname + ".lora_a", a, tensor_type_for(gname + ".lora_a", 2, gguf_type))
            w.tensor(gname + ".lora_b", b, tensor_type_for(gname + ".lora_b", 2, gguf_type))
        w.summary.metadata = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": alpha}
        return w.finish()
    except BaseException:
        w.abort()
        raise


def _quant_version() -> int:
    import gguf

    return int(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------- model


def _rope_theta(config: dict) -> float:
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(_hp(config, "rope_theta", default=None) or rp.get("rope_theta") or 10000.0)


def _check_rope(config: dict) -> None:
    rp = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rp.get("rope_type") or rp.get("type")
    if kind not in (None, "default"):
        raise GGUFExportError(
            f"RoPE scaling {kind!r} is not written by deltatune's GGUF writer: write the merged model as a folder "
            "(deltatune merge --out DIR) and convert it with llama.cpp's convert_hf_to_gguf.py")


def file_type(gguf_type: str) -> int:
    """``general.file_type`` (llama.cpp's ``LlamaFileType``) of an output type."""
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])


def model_tensors(state_dict: dict, config: dict) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) of a transformers state dict, q/k permuted for llama, the tied head left out.

    Raises:
        GGUFExportError: a parameter without GGUF name (adapter tensors included: merge first).
    """
    arch, permute = architecture(config)
    sizes = _sizes(config)
    name_map = _name_map(arch, sizes["n_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    out = []
    for k, t in state_dict.items():
        if ".adapters." in f".{k}.":
            raise GGUFExportError(f"{k} is an adapter tensor: merge the adapters first (merge_and_unload)")
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if tied and k == "lm_head.weight":
            continue  # llama.cpp uses token_embd.weight when output.weight is absent
        gname = gguf_tensor_name(name_map, k)
        heads = _permute_heads(gname, permute, sizes)
        out.append((gname, llama_permute(t, heads) if heads is not None else t))
    return out


def write_model_gguf(path: str, state_dict: dict, config: dict, *, gguf_type: str = "f32",
                     tokenizer: Optional[dict] = None, name: Optional[str] = None) -> GGUFSummary:
    """Write a transformers causal LM (its ``state_dict`` and ``config`` dict) as a GGUF model file.

    Args:
        tokenizer: GGUF tokenizer fields (:func:`tokenizer_fields`); None writes none (transformers can
            load the weights; llama.cpp needs a tokenizer).
        gguf_type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (1-D tensors and norms stay float32).

    Raises:
        GGUFExportError: an unsupported architecture or RoPE scaling, a tensor without GGUF name, or
            an unknown type.
    """
    _check_type(gguf_type)
    arch, _ = architecture(config)
    _check_rope(config)
    sizes = _sizes(config)
    tensors = model_tensors(state_dict, config)
    w = _Writer(path, arch)
    try:
        g = w.w
        g.add_type("model")
        g.add_name(name or os.path.splitext(os.path.basename(path))[0])
        g.add_uint32(f"{arch}.block_count", sizes["n_layers"])
        g.add_uint32(f"{arch}.context_length", int(_hp(config, "max_position_embeddings", default=2048)))
        g.add_uint32(f"{arch}.embedding_length", sizes["hidden"])
        g.add_uint32(f"{arch}.feed_forward_length", int(_hp(config, "intermediate_size")))
        g.add_uint32(f"{arch}.attention.head_count", sizes["n_head"])
        g.add_uint32(f"{arch}.attention.head_count_kv", sizes["n_head_kv"])
        g.add_float32(f"{arch}.rope.freq_base", _rope_theta(config))
        g.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(_hp(config, "rms_norm_eps", default=1e-6)))
        g.add_uint32("general.file_type", file_type(gguf_type))
        g.add_uint32(f"{arch}.vocab_size", int(_hp(config, "vocab_size")))
        g.add_uint32(f"{arch}.rope.dimension_count", sizes["head_dim"])
        if config.get("head_dim") is not None and sizes["head_dim"] != sizes["hidden"] // sizes["n_head"]:
            g.add_uint32(f"{arch}.attention.key_length", sizes["head_dim"])
            g.add_uint32(f"{arch}.attention.value_length", sizes["head_dim"])
        for key, (value, vtype, sub) in (tokenizer or {}).items():
            g.add_key_value(key, value, vtype, sub_type=sub)
        g.add_quantization_version(_quant_version())
        for gname, t in tensors:
            w.tensor(gname, t, tensor_type_for(gname, t.dim(), gguf_type))
        w.summary.metadata = {"general.type": "model", "general.file_type": file_type(gguf_type)}
        return w.finish()
    except BaseException:
        w.abort()
        raise


def tokenizer_fields(gguf_path: str) -> dict:
    """The tokenizer metadata of a GGUF file: ``{key: (value, GGUFValueType, array item type or None)}``
    for every ``tokenizer.*`` key (vocabulary, merges, special ids, chat template), to copy into another
    file with :func:`write_model_gguf`."""
    import gguf

    out = {}
    reader = gguf.GGUFReader(gguf_path)
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        sub = fld.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(fld.types) > 1 else None
        out[key] = (fld.contents(), vtype, sub)
    return out


def read_metadata(gguf_path: str, keys=None) -> dict:
    """``{key: value}`` of a GGUF file's metadata (all keys, or ``keys``; array values as lists)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    return {k: f.contents() for k, f in reader.fields.items() if keys is None or k in keys}


# ----------------------------------------------------------------------------- Ollama


_S, _U, _A = "SYSTEMxq7", "USERxq7", "ASSISTANTxq7"


def _go_literal(text: str) -> str:
    """Template text as Go template literal text (``{{`` written as an action that prints it)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(render: Callable[[list, bool], str]) -> Optional[tuple[str, Optional[str]]]:
    """(Ollama Go ``TEMPLATE``, default ``SYSTEM`` text or None) equivalent to a chat template, found by
    rendering probe conversations with ``render(messages, add_generation_prompt) -> text``; None when the
    template does not render conversations incrementally (then Ollama's own reading of the GGUF's
    ``tokenizer.chat_template`` is left in charge).

    The template: the system block when ``.System`` is set (else what the template writes without a
    system message), each user and assistant message of ``.Messages`` with its own prefix and suffix,
    then the generation prompt.
    """
    try:
        r_s = render([{"role": "system", "content": _S}], False)
        r_su = render([{"role": "system", "content": _S}, {"role": "user", "content": _U}], False)
        r_sug = render([{"role": "system", "content": _S}, {"role": "user", "content": _U}], True)
        r_sua = render([{"role": "system", "content": _S}, {"role": "user", "content": _U},
                        {"role": "assistant", "content": _A}], False)
        r_u = render([{"role": "user", "content": _U}], False)
    except Exception:
        return None
    if not (r_su.startswith(r_s) and r_sua.startswith(r_su) and r_sug.startswith(r_su)) or r_s.count(_S) != 1:
        return None
    sys_pre, sys_post = r_s.split(_S)
    user, asst, gen = r_su[len(r_s):], r_sua[len(r_su):], r_sug[len(r_su):]
    if user.count(_U) != 1 or asst.count(_A) != 1 or not r_u.endswith(user):
        return None
    u_pre, u_post = user.split(_U)
    a_pre, a_post = asst.split(_A)
    lead, default_system = r_u[: len(r_u) - len(user)], None
    if lead and lead.startswith(sys_pre) and lead.endswith(sys_post) and len(lead) > len(sys_pre) + len(sys_post):
        default_system, lead = lead[len(sys_pre): len(lead) - len(sys_post)], ""
    t = (f"{{{{ if .System }}}}{_go_literal(sys_pre)}{{{{ .System }}}}{_go_literal(sys_post)}"
         f"{{{{ else }}}}{_go_literal(lead)}{{{{ end }}}}"
         f"{{{{ range .Messages }}}}{{{{ if eq .Role \"user\" }}}}{_go_literal(u_pre)}{{{{ .Content }}}}"
         f"{_go_literal(u_post)}{{{{ else if eq .Role \"assistant\" }}}}{_go_literal(a_pre)}{{{{ .Content }}}}"
         f"{_go_literal(a_post)}{{{{ end }}}}{{{{ end }}}}{_go_literal(gen)}")
    return t, default_system


def _quoted(text: str) -> Optional[str]:
    return None if '"""' in text else f'"""{text}"""'


def modelfile_text(from_: str, *, adapter: Optional[str] = None, template: Optional[str] = None,
                   system: Optional[str] = None, stops=(), note: str = "") -> str:
    """An Ollama ``Modelfile``: ``FROM`` the base (or merged) model, ``ADAPTER`` the LoRA GGUF, the chat
    ``TEMPLATE`` (Go syntax), the default ``SYSTEM`` message and the end-of-turn ``stop`` strings."""
    lines = ["# Ollama Modelfile written by deltatune. Create the model with:",
             "#   ollama create NAME -f " + "Modelfile", *(f"# {x}" for x in note.splitlines() if x), "",
             f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    qt = _quoted(template) if template else None
    if qt:
        lines.append(f"TEMPLATE {qt}")
    else:
        lines.append("# no TEMPLATE: Ollama reads the chat template from the GGUF's tokenizer.chat_template")
    qs = _quoted(system) if system else None
    if qs:
        lines.append(f"SYSTEM {qs}")
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"


def write_modelfile(path: str, text: str) -> str:
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
