"""CLI method name -> adapter config builder.

Each builder takes the parsed training options (a dict of CLI/YAML values; unknown keys ignored)
and returns a config for :func:`deltatune.inject`. Methods register themselves here so that
``deltatune train --method NAME`` and the README's method table stay in one place.
"""

from __future__ import annotations

from typing import Callable

METHOD_BUILDERS: dict[str, Callable[[dict], object]] = {}
# CLI method name -> peak learning rate used when neither --lr nor a config file sets one. Soft
# prompts and (IA)3 vectors train a few thousand parameters from an identity-like start and want
# larger steps than LoRA (prompt tuning: Lester et al. used 0.3 with Adafactor; PEFT's examples 3e-2).
METHOD_LR: dict[str, float] = {}
DEFAULT_LR = 1e-3
# CLI method name -> the method-specific option names its builder (and preparer) reads from
# --method-opt / method_options; any other name there is an error (a typo must not be ignored)
METHOD_OPTIONS: dict[str, tuple] = {}
_LORA_OPTS = ("use_rslora", "use_dora")


def register_cli_method(name: str, lr: float = DEFAULT_LR, options: tuple = ()):
    """Register a builder under ``name`` with its default peak lr and its --method-opt names."""
    def deco(fn):
        METHOD_BUILDERS[name] = fn
        METHOD_LR[name] = float(lr)
        METHOD_OPTIONS[name] = tuple(options)
        return fn

    return deco


def default_lr(method: str) -> float:
    """The peak learning rate of ``method`` when the user sets none (1e-3 for unknown names)."""
    return METHOD_LR.get(method, DEFAULT_LR) if isinstance(method, str) else DEFAULT_LR


@register_cli_method("lora", options=_LORA_OPTS)
def build_lora(opts: dict):
    from ..methods.lora import LoraConfig

    return LoraConfig(
        r=int(opts.get("r", 16)),
        lora_alpha=float(opts.get("lora_alpha", 32)),
        lora_dropout=float(opts.get("lora_dropout", 0.0)),
        target_modules=_opt_targets(opts.get("target_modules")) or "all-linear",
        use_rslora=bool(_opt_bool(opts.get("use_rslora"), "use_rslora")),
        use_dora=bool(_opt_bool(opts.get("use_dora"), "use_dora")),
    )


@register_cli_method("dora", options=_LORA_OPTS)
def build_dora(opts: dict):
    return build_lora({**opts, "use_dora": True})


# CLI method name -> fn(model, opts) -> dict of extra report fields, run on the loaded base model
# BEFORE the adapter is injected (e.g. "qlora" quantizes the base and reports base_weight_bytes,
# quantized_params). Methods without an entry use the model as loaded.
MODEL_PREPARERS: dict[str, Callable] = {}


def register_model_preparer(name: str):
    def deco(fn):
        MODEL_PREPARERS[name] = fn
        return fn

    return deco


def _opt_bool(v, name: str):
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name!r} must be true or false, got {v!r}")


def _opt_targets(v):
    """None for the method's own default ("all-linear", the CLI-wide default, included); a regex
    string stays a string; "a,b" or a YAML list becomes a list."""
    if v is None or v == "" or v == "all-linear" or v == ["all-linear"]:
        return None
    if isinstance(v, str):
        if any(c in v for c in ".*[]()|^$\\+?"):
            return v
        return [s.strip() for s in v.split(",") if s.strip()]
    return list(v)


@register_cli_method("ia3", lr=1e-2, options=("feedforward_modules", "init_ia3_weights"))
def build_ia3(opts: dict):
    """(IA)3 (arXiv:2205.05638). Options: ``target_modules`` (default, and for the CLI-wide
    "all-linear": the model type's standard (IA)3 targets, e.g. Llama k_proj, v_proj, down_proj),
    ``feedforward_modules`` ("a,b" or a list; default: the model type's), ``init_ia3_weights``."""
    from ..methods.ia3 import IA3Config

    ff = opts.get("feedforward_modules")
    if isinstance(ff, str):
        ff = [s.strip() for s in ff.split(",") if s.strip()]
    init = _opt_bool(opts.get("init_ia3_weights"), "init_ia3_weights")
    return IA3Config(target_modules=_opt_targets(opts.get("target_modules")), feedforward_modules=ff,
                     init_ia3_weights=True if init is None else init)


@register_cli_method("bottleneck", options=(
    "style", "reduction_factor", "non_linearity", "init_weights", "scaling", "original_ln_before",
    "original_ln_after", "residual_before_ln", "mh_adapter", "output_adapter", "leave_out", "adapter_dropout"))
def build_bottleneck(opts: dict):
    """Bottleneck adapters (Houlsby arXiv:1902.00751, Pfeiffer arXiv:2005.00247, parallel
    arXiv:2110.04366). Options (AdapterHub names; unset ones take the style's default): ``style``
    ("houlsby" | "pfeiffer" | "parallel"), ``reduction_factor``, ``non_linearity``, ``scaling``
    (number, "learned" or "channel"), ``original_ln_before``, ``original_ln_after``,
    ``residual_before_ln``, ``leave_out`` ("0,3" or a list), ``mh_adapter``, ``output_adapter``,
    ``init_weights``, ``adapter_dropout``; ``target_modules`` names plain modules instead of the
    model's attention/feed-forward blocks (the CLI-wide "all-linear" means: the blocks)."""
    from ..methods.bottleneck import BottleneckConfig

    kw = {}
    rf = opts.get("reduction_factor")
    if rf is not None:
        kw["reduction_factor"] = rf if isinstance(rf, dict) else float(rf)
    for k in ("non_linearity", "init_weights", "scaling"):
        if opts.get(k) is not None:
            kw[k] = opts[k]
    for k in ("original_ln_before", "original_ln_after", "residual_before_ln", "mh_adapter", "output_adapter"):
        v = _opt_bool(opts.get(k), k)
        if v is not None:
            kw[k] = v
    lo = opts.get("leave_out")
    if lo is not None:
        kw["leave_out"] = [int(s) for s in (lo.split(",") if isinstance(lo, str) else lo) if str(s).strip() != ""]
    if opts.get("adapter_dropout") is not None:
        kw["dropout"] = float(opts["adapter_dropout"])
    return BottleneckConfig(style=opts.get("style") or "houlsby", target_modules=_opt_targets(opts.get("target_modules")),
                            **kw)


@register_cli_method("qlora", options=_LORA_OPTS + ("quant_type", "double_quant", "compute_dtype", "quant_backend"))
def build_qlora(opts: dict):
    """QLoRA (arXiv:2305.14314) trains the same LoRA as ``lora``; the 4-bit base is the preparer's."""
    return build_lora(opts)


@register_model_preparer("qlora")
def prepare_qlora(model, opts: dict) -> dict:
    """Quantize the loaded base to 4 bits (:func:`deltatune.quantize_base`) before injection.

    Options (all optional): ``quant_type`` ("nf4" | "fp4"), ``double_quant`` (True),
    ``compute_dtype`` ("float32" | "bfloat16"), ``quant_backend`` ("bitsandbytes" | "torchao").
    Returns the report fields ``base_weight_bytes`` (bytes of all frozen base weights in memory,
    scales included, measured from the tensors), ``quantized_params``, and the details of
    :func:`deltatune.quant.quant_stats`.
    """
    from ..quant import quant_stats, quantize_base

    dq = _opt_bool(opts.get("double_quant"), "double_quant")
    dq = True if dq is None else dq
    quantize_base(model, quant_type=opts.get("quant_type") or "nf4", double_quant=bool(dq),
                  compute_dtype=opts.get("compute_dtype") or "float32",
                  backend=opts.get("quant_backend") or "bitsandbytes")
    return quant_stats(model)

# ----------------------------------------------------------------------------- prompt methods

# TEXT init of prompt tuning on the default task (arXiv:2104.08691 found task-describing text a
# good start); with --data, a neutral instruction.
PROMPT_INIT_TEXT_TASK = ("Give the requested form of the English word: past tense, past participle, -ing form, "
                         "plural, comparative or superlative. Answer with one word.")
PROMPT_INIT_TEXT_DATA = "Answer the user's request accurately and briefly."


def _opt_int(opts: dict, name: str, default):
    v = opts.get(name)
    return default if v is None or v == "" else int(v)


def _run_tokenizer(opts: dict):
    """(tokenizer_name_or_path, tokenizer_kwargs) of the run's model, or None when it cannot be found."""
    from ..integrations.transformers import ModelNotFoundError, resolve_model

    try:
        src = resolve_model(opts.get("model"))
    except (ModelNotFoundError, OSError):
        return None
    return src.folder, ({"gguf_file": src.gguf_file} if src.gguf_file else None)


@register_cli_method("prompt-tuning", lr=3e-2,
                     options=("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"))
def build_prompt_tuning(opts: dict):
    """Prompt tuning (arXiv:2104.08691). Options: ``num_virtual_tokens`` (20), ``prompt_tuning_init``
    ("TEXT" (default; the run's tokenizer) | "RANDOM" | "SAMPLE_VOCAB"), ``prompt_tuning_init_text``
    (default: a sentence describing the default task, or a neutral instruction with --data).
    Soft prompts want a larger learning rate than LoRA (e.g. --lr 3e-2)."""
    from ..methods.prompt import PromptTuningConfig

    init = str(opts.get("prompt_tuning_init") or "TEXT").upper()
    text = opts.get("prompt_tuning_init_text") or (PROMPT_INIT_TEXT_DATA if opts.get("data") else PROMPT_INIT_TEXT_TASK)
    kw = {}
    if init == "TEXT":
        tok = _run_tokenizer(opts)
        if tok is None:
            init = "RANDOM"
        else:
            kw = dict(prompt_tuning_init_text=text, tokenizer_name_or_path=tok[0], tokenizer_kwargs=tok[1])
    return PromptTuningConfig(num_virtual_tokens=_opt_int(opts, "num_virtual_tokens", 20), prompt_tuning_init=init,
                              **kw)


@register_cli_method("p-tuning", lr=1e-2, options=("num_virtual_tokens", "encoder_reparameterization_type",
                                                      "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"))
def build_p_tuning(opts: dict):
    """P-tuning (arXiv:2103.10385). Options: ``num_virtual_tokens`` (20),
    ``encoder_reparameterization_type`` ("MLP" | "LSTM"), ``encoder_hidden_size`` (default: the
    model's hidden size, as PEFT), ``encoder_num_layers`` (2), ``encoder_dropout`` (0)."""
    from ..methods.prompt import PromptEncoderConfig

    return PromptEncoderConfig(
        num_virtual_tokens=_opt_int(opts, "num_virtual_tokens", 20),
        encoder_reparameterization_type=str(opts.get("encoder_reparameterization_type") or "MLP").upper(),
        encoder_hidden_size=_opt_int(opts, "encoder_hidden_size", None),
        encoder_num_layers=_opt_int(opts, "encoder_num_layers", 2),
        encoder_dropout=float(opts.get("encoder_dropout") or 0.0),
    )


@register_cli_method("prefix-tuning", lr=1e-2,
                     options=("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"))
def build_prefix_tuning(opts: dict):
    """Prefix tuning (arXiv:2101.00190). Options: ``num_virtual_tokens`` (20), ``prefix_projection``
    (false), ``encoder_hidden_size`` (default: the prefix width, as PEFT)."""
    from ..methods.prefix import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=_opt_int(opts, "num_virtual_tokens", 20),
                              prefix_projection=bool(_opt_bool(opts.get("prefix_projection"), "prefix_projection")),
                              encoder_hidden_size=_opt_int(opts, "encoder_hidden_size", None))


@register_cli_method("llama-adapter", lr=1e-2, options=("adapter_len", "adapter_layers"))
def build_llama_adapter(opts: dict):
    """LLaMA-Adapter (arXiv:2303.16199). Options: ``adapter_len`` (10, the paper's), ``adapter_layers``
    (8 top layers), ``target_modules`` (the attention submodule name; default from the model type).
    The zero-init gate starts from the base model; it wants a larger learning rate (e.g. --lr 1e-2)."""
    from ..methods.adaption_prompt import AdaptionPromptConfig

    tm = opts.get("target_modules")
    tm = tm if isinstance(tm, str) and tm not in ("", "all-linear") and "," not in tm else None
    return AdaptionPromptConfig(adapter_len=_opt_int(opts, "adapter_len", 10),
                                adapter_layers=_opt_int(opts, "adapter_layers", 8), target_modules=tm)
