"""The CLI's methods: one :class:`Preset` per ``deltatune train --method NAME``, in one registry.

A preset says everything the command line knows about a method: how to build its adapter config
from the typed training options (``build(cfg, options)``), its default peak learning rate, the
``--method-opt`` names it reads, an optional model preparer run before injection (``qlora``
quantizes the base), which method-specific :class:`~deltatune.train.config.TrainConfig`
fields it reads (``uses``), and whether it trains the model's own weights instead of an adapter
(``trains_base``: ``full``, see :mod:`deltatune.train.full`). A flag among :data:`METHOD_FIELDS` that the chosen method does not
read is an error when the user set it (see :func:`deltatune.train.config.build_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..integrations.transformers import ModelNotFoundError, resolve_model
from ..methods.adaption_prompt import AdaptionPromptConfig
from ..methods.bottleneck import BottleneckConfig
from ..methods.ia3 import IA3Config
from ..methods.lora import LoraConfig
from ..methods.prefix import PrefixTuningConfig
from ..methods.prompt import PromptEncoderConfig, PromptTuningConfig
from ..quant import quant_stats, quantize_base

if TYPE_CHECKING:  # annotations only: config.py imports this module
    from .config import TrainConfig

DEFAULT_LR = 1e-3
# the TrainConfig fields that belong to some methods only, and their flags
METHOD_FIELDS = {"r": "--rank", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
                 "target_modules": "--target-modules"}


@dataclass(frozen=True)
class Preset:
    """One CLI method.

    Attributes:
        build: ``(cfg, options) -> adapter config``; ``options`` is ``cfg.method_options``.
        lr: peak learning rate when neither ``--lr`` nor a config file sets one.
        options: the ``--method-opt`` names ``build`` (and ``prepare``) read; any other is an error.
        prepare: ``(model, options) -> dict of extra report fields``, run on the loaded base
            before the adapter is injected (e.g. quantization); None: the model as loaded.
        uses: the :data:`METHOD_FIELDS` that ``build`` reads.
        trains_base: no adapter: ``build`` returns :class:`FullFineTuning`, nothing is injected, every
            weight trains and the run writes a model folder (:mod:`deltatune.train.full`).
    """

    name: str
    build: Callable[["TrainConfig", dict], object]
    lr: float = DEFAULT_LR
    options: tuple = ()
    prepare: Optional[Callable[[object, dict], dict]] = None
    uses: frozenset = frozenset()
    trains_base: bool = False

    def describe_options(self) -> str:
        """``--target-modules; --method-opt a, b`` (for error messages)."""
        flags = [f for k, f in METHOD_FIELDS.items() if k in self.uses]
        parts = [", ".join(flags)] if flags else []
        if self.options:
            parts.append("--method-opt " + ", ".join(self.options))
        return "; ".join(parts) or "(none)"


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    unknown = set(preset.uses) - set(METHOD_FIELDS)
    if unknown:
        raise ValueError(f"preset {preset.name!r}: uses names no method field: {sorted(unknown)}")
    PRESETS[preset.name] = preset
    return preset


def default_lr(method: str) -> float:
    """The peak learning rate of ``method`` when the user sets none (1e-3 for unknown names)."""
    p = PRESETS.get(method) if isinstance(method, str) else None
    return p.lr if p is not None else DEFAULT_LR


# ----------------------------------------------------------------------------- option parsing


def _opt_bool(options: dict, name: str, default=None):
    v = options.get(name)
    if v is None or isinstance(v, bool):
        return default if v is None else v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name!r} must be true or false, got {v!r}")


def _opt_int(options: dict, name: str, default):
    v = options.get(name)
    return default if v is None or v == "" else int(v)


def _targets(v):
    """None for the method's own default ("all-linear", the CLI-wide default, included); a regex
    string stays a string; "a,b" or a YAML list becomes a list."""
    if v is None or v == "" or v == "all-linear" or v == ["all-linear"]:
        return None
    if isinstance(v, str):
        if any(c in v for c in ".*[]()|^$\\+?"):
            return v
        return [s.strip() for s in v.split(",") if s.strip()]
    return list(v)


# ----------------------------------------------------------------------------- LoRA family


def build_lora(cfg: "TrainConfig", options: dict) -> LoraConfig:
    return LoraConfig(
        r=int(cfg.r),
        lora_alpha=float(cfg.lora_alpha),
        lora_dropout=float(cfg.lora_dropout),
        target_modules=_targets(cfg.target_modules) or "all-linear",
        use_rslora=bool(_opt_bool(options, "use_rslora")),
        use_dora=bool(_opt_bool(options, "use_dora")),
    )


def build_dora(cfg: "TrainConfig", options: dict) -> LoraConfig:
    return build_lora(cfg, {**options, "use_dora": True})


def _float_dtype(model) -> str:
    return str(next((p.dtype for p in model.parameters() if p.is_floating_point()), "float32")).replace("torch.", "")


def prepare_qlora(model, options: dict) -> dict:
    """Quantize the loaded base to 4 bits (:func:`deltatune.quantize_base`) before injection.

    Options (all optional): ``quant_type`` ("nf4" | "fp4"), ``double_quant`` (True),
    ``compute_dtype`` ("float32" | "bfloat16"; default: the dtype the base was loaded in, i.e. the
    run's precision), ``quant_backend`` ("bitsandbytes" | "torchao").
    Returns the report fields ``base_weight_bytes`` (bytes of all frozen base weights in memory,
    scales included, measured from the tensors), ``quantized_params``, and the details of
    :func:`deltatune.quant.quant_stats`.
    """
    quantize_base(model, quant_type=options.get("quant_type") or "nf4",
                  double_quant=bool(_opt_bool(options, "double_quant", True)),
                  compute_dtype=options.get("compute_dtype") or _float_dtype(model),
                  backend=options.get("quant_backend") or "bitsandbytes")
    return quant_stats(model)


# ----------------------------------------------------------------------------- (IA)3 and bottleneck


def build_ia3(cfg: "TrainConfig", options: dict) -> IA3Config:
    """(IA)3 (arXiv:2205.05638). ``--target-modules`` (default, and for the CLI-wide "all-linear":
    the model type's standard (IA)3 targets, e.g. Llama k_proj, v_proj, down_proj); options
    ``feedforward_modules`` ("a,b" or a list; default: the model type's), ``init_ia3_weights``."""
    ff = options.get("feedforward_modules")
    if isinstance(ff, str):
        ff = [s.strip() for s in ff.split(",") if s.strip()]
    return IA3Config(target_modules=_targets(cfg.target_modules), feedforward_modules=ff,
                     init_ia3_weights=_opt_bool(options, "init_ia3_weights", True))


_BOTTLENECK_BOOLS = ("original_ln_before", "original_ln_after", "residual_before_ln", "mh_adapter", "output_adapter")


def build_bottleneck(cfg: "TrainConfig", options: dict) -> BottleneckConfig:
    """Bottleneck adapters (Houlsby arXiv:1902.00751, Pfeiffer arXiv:2005.00247, parallel
    arXiv:2110.04366). Options (AdapterHub names; unset ones take the style's default): ``style``
    ("houlsby" | "pfeiffer" | "parallel"), ``reduction_factor``, ``non_linearity``, ``scaling``
    (number, "learned" or "channel"), ``original_ln_before``, ``original_ln_after``,
    ``residual_before_ln``, ``leave_out`` ("0,3" or a list), ``mh_adapter``, ``output_adapter``,
    ``init_weights``, ``adapter_dropout``; ``--target-modules`` names plain modules instead of the
    model's attention/feed-forward blocks (the CLI-wide "all-linear" means: the blocks)."""
    kw = {}
    rf = options.get("reduction_factor")
    if rf is not None:
        kw["reduction_factor"] = rf if isinstance(rf, dict) else float(rf)
    for k in ("non_linearity", "init_weights", "scaling"):
        if options.get(k) is not None:
            kw[k] = options[k]
    for k in _BOTTLENECK_BOOLS:
        v = _opt_bool(options, k)
        if v is not None:
            kw[k] = v
    lo = options.get("leave_out")
    if lo is not None:
        kw["leave_out"] = [int(s) for s in (lo.split(",") if isinstance(lo, str) else lo) if str(s).strip() != ""]
    if options.get("adapter_dropout") is not None:
        kw["dropout"] = float(options["adapter_dropout"])
    return BottleneckConfig(style=options.get("style") or "houlsby", target_modules=_targets(cfg.target_modules),
                            **kw)


# ----------------------------------------------------------------------------- prompt methods

# TEXT init of prompt tuning on the default task (arXiv:2104.08691 found task-describing text a
# good start); with --data, a neutral instruction.
PROMPT_INIT_TEXT_TASK = ("Give the requested form of the English word: past tense, past participle, -ing form, "
                         "plural, comparative or superlative. Answer with one word.")
PROMPT_INIT_TEXT_DATA = "Answer the user's request accurately and briefly."


def _run_tokenizer(model: Optional[str]):
    """(tokenizer_name_or_path, tokenizer_kwargs) of the run's model, or None when it cannot be found."""
    try:
        src = resolve_model(model)
    except (ModelNotFoundError, OSError):
        return None
    return src.folder, ({"gguf_file": src.gguf_file} if src.gguf_file else None)


def build_prompt_tuning(cfg: "TrainConfig", options: dict) -> PromptTuningConfig:
    """Prompt tuning (arXiv:2104.08691). Options: ``num_virtual_tokens`` (20), ``prompt_tuning_init``
    ("TEXT" (default; the run's tokenizer) | "RANDOM" | "SAMPLE_VOCAB"), ``prompt_tuning_init_text``
    (default: a sentence describing the default task, or a neutral instruction with --data).
    Soft prompts want a larger learning rate than LoRA (e.g. --lr 3e-2)."""
    init = str(options.get("prompt_tuning_init") or "TEXT").upper()
    text = options.get("prompt_tuning_init_text") or (PROMPT_INIT_TEXT_DATA if cfg.data else PROMPT_INIT_TEXT_TASK)
    kw = {}
    if init == "TEXT":
        tok = _run_tokenizer(cfg.model)
        if tok is None:
            init = "RANDOM"
        else:
            kw = dict(prompt_tuning_init_text=text, tokenizer_name_or_path=tok[0], tokenizer_kwargs=tok[1])
    return PromptTuningConfig(num_virtual_tokens=_opt_int(options, "num_virtual_tokens", 20),
                              prompt_tuning_init=init, **kw)


def build_p_tuning(cfg: "TrainConfig", options: dict) -> PromptEncoderConfig:
    """P-tuning (arXiv:2103.10385). Options: ``num_virtual_tokens`` (20),
    ``encoder_reparameterization_type`` ("MLP" | "LSTM"), ``encoder_hidden_size`` (default: the
    model's hidden size, as PEFT), ``encoder_num_layers`` (2), ``encoder_dropout`` (0)."""
    return PromptEncoderConfig(
        num_virtual_tokens=_opt_int(options, "num_virtual_tokens", 20),
        encoder_reparameterization_type=str(options.get("encoder_reparameterization_type") or "MLP").upper(),
        encoder_hidden_size=_opt_int(options, "encoder_hidden_size", None),
        encoder_num_layers=_opt_int(options, "encoder_num_layers", 2),
        encoder_dropout=float(options.get("encoder_dropout") or 0.0),
    )


def build_prefix_tuning(cfg: "TrainConfig", options: dict) -> PrefixTuningConfig:
    """Prefix tuning (arXiv:2101.00190). Options: ``num_virtual_tokens`` (20), ``prefix_projection``
    (false), ``encoder_hidden_size`` (default: the prefix width, as PEFT)."""
    return PrefixTuningConfig(num_virtual_tokens=_opt_int(options, "num_virtual_tokens", 20),
                              prefix_projection=bool(_opt_bool(options, "prefix_projection")),
                              encoder_hidden_size=_opt_int(options, "encoder_hidden_size", None))


def build_llama_adapter(cfg: "TrainConfig", options: dict) -> AdaptionPromptConfig:
    """LLaMA-Adapter (arXiv:2303.16199). Options: ``adapter_len`` (10, the paper's), ``adapter_layers``
    (8 top layers); ``--target-modules`` names the attention submodule (default from the model type).
    The zero-init gate starts from the base model; it wants a larger learning rate (e.g. --lr 1e-2)."""
    tm = cfg.target_modules
    tm = tm if isinstance(tm, str) and tm not in ("", "all-linear") and "," not in tm else None
    return AdaptionPromptConfig(adapter_len=_opt_int(options, "adapter_len", 10),
                                adapter_layers=_opt_int(options, "adapter_layers", 8), target_modules=tm)


# ----------------------------------------------------------------------------- full fine-tuning


@dataclass(frozen=True)
class FullFineTuning:
    """The "config" of ``--method full``: no adapter; every weight of the model trains."""

    peft_type: str = "FULL"
    is_prompt_learning: bool = False


def build_full(cfg: "TrainConfig", options: dict) -> FullFineTuning:
    return FullFineTuning()


def prepare_full(model, options: dict) -> dict:
    """The base stays frozen while it is scored (the run makes every weight trainable just before the
    loop); returns the report field ``weights_dtype`` (float32: the master weights)."""
    model.requires_grad_(False)
    return {"weights_dtype": _float_dtype(model)}


# Full fine-tuning moves all 135 M weights of the default model: AdamW's first steps move each by
# about lr, so the adapter methods' 1e-3 would wreck it. 3e-5 lies in the usual range for a model of
# this size (2e-5 .. 5e-5) and its loss falls steadily on the default task (README: the 30-step check).
FULL_LR = 3e-5

# ----------------------------------------------------------------------------- the registry

_LORA_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules"})
_TARGETS = frozenset({"target_modules"})
_LORA_OPTS = ("use_rslora", "use_dora")
_PROMPT_OPTS = ("num_virtual_tokens",)

for _preset in (
    Preset("lora", build_lora, options=_LORA_OPTS, uses=_LORA_FIELDS),
    Preset("dora", build_dora, options=_LORA_OPTS, uses=_LORA_FIELDS),
    # QLoRA (arXiv:2305.14314) trains the same LoRA as "lora"; the 4-bit base is the preparer's
    Preset("qlora", build_lora, options=_LORA_OPTS + ("quant_type", "double_quant", "compute_dtype", "quant_backend"),
           prepare=prepare_qlora, uses=_LORA_FIELDS),
    # soft prompts and (IA)3 vectors train a few thousand parameters from an identity-like start and
    # want larger steps than LoRA (prompt tuning: Lester et al. used 0.3 with Adafactor; PEFT's examples 3e-2)
    Preset("ia3", build_ia3, lr=1e-2, options=("feedforward_modules", "init_ia3_weights"), uses=_TARGETS),
    Preset("bottleneck", build_bottleneck, uses=_TARGETS, options=(
        "style", "reduction_factor", "non_linearity", "init_weights", "scaling", "original_ln_before",
        "original_ln_after", "residual_before_ln", "mh_adapter", "output_adapter", "leave_out", "adapter_dropout")),
    Preset("prompt-tuning", build_prompt_tuning, lr=3e-2,
           options=_PROMPT_OPTS + ("prompt_tuning_init", "prompt_tuning_init_text")),
    Preset("p-tuning", build_p_tuning, lr=1e-2, options=_PROMPT_OPTS + (
        "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")),
    Preset("prefix-tuning", build_prefix_tuning, lr=1e-2,
           options=_PROMPT_OPTS + ("prefix_projection", "encoder_hidden_size")),
    Preset("llama-adapter", build_llama_adapter, lr=1e-2, options=("adapter_len", "adapter_layers"), uses=_TARGETS),
    Preset("full", build_full, lr=FULL_LR, prepare=prepare_full, trains_base=True),
):
    register_preset(_preset)
