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

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from ..integrations.transformers import ModelNotFoundError, resolve_model
from ..methods.adalora import AdaLoraConfig
from ..methods.adaption_prompt import AdaptionPromptConfig
from ..methods.boft import BOFTConfig
from ..methods.bottleneck import BottleneckConfig
from ..methods.ia3 import IA3Config
from ..methods.lora import LoraConfig
from ..methods.lycoris import LoHaConfig, LoKrConfig
from ..methods.oft import OFTConfig
from ..methods.prefix import PrefixTuningConfig
from ..methods.prompt import PromptEncoderConfig, PromptTuningConfig
from ..methods.vera import VeraConfig
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
        field_defaults: the method's own defaults of fields it reads, used where the user sets none
            (VeRA's ``r`` is 256, not the CLI-wide 16).
        trains_base: no adapter: ``build`` returns :class:`FullFineTuning`, nothing is injected, every
            weight trains and the run writes a model folder (:mod:`deltatune.train.full`).
    """

    name: str
    build: Callable[["TrainConfig", dict], object]
    lr: float = DEFAULT_LR
    options: tuple = ()
    prepare: Optional[Callable[[object, dict], dict]] = None
    uses: frozenset = frozenset()
    field_defaults: dict = field(default_factory=dict)
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
    unknown = (set(preset.uses) | set(preset.field_defaults)) - set(METHOD_FIELDS)
    if unknown or not set(preset.field_defaults) <= set(preset.uses):
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


def _opt_float(options: dict, name: str, default):
    v = options.get(name)
    return default if v is None or v == "" else float(v)


def _opts(options: dict, spec: dict) -> dict:
    """The options of ``spec`` (name -> "bool" | "int" | "float" | "str") the user set, parsed."""
    parse = {"bool": lambda n: _opt_bool(options, n), "int": lambda n: _opt_int(options, n, None),
             "float": lambda n: _opt_float(options, n, None), "str": lambda n: options.get(n)}
    out = {n: parse[t](n) for n, t in spec.items()}
    return {n: v for n, v in out.items() if v is not None}


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


# ----------------------------------------------------------------------------- LoHa, LoKr, VeRA, AdaLoRA, OFT, BOFT

_LYCORIS_OPTS = {"rank_dropout": "float", "module_dropout": "float", "use_effective_conv2d": "bool",
                 "init_weights": "bool"}
_LOKR_OPTS = {**_LYCORIS_OPTS, "decompose_both": "bool", "decompose_factor": "int", "rank_dropout_scale": "bool",
              "init_weights": "str"}
_VERA_OPTS = {"projection_prng_key": "int", "save_projection": "bool", "vera_dropout": "float",
              "d_initial": "float"}
_ADALORA_OPTS = {"target_r": "int", "tinit": "int", "tfinal": "int", "deltaT": "int", "beta1": "float",
                 "beta2": "float", "orth_reg_weight": "float", "total_step": "int"}
_OFT_OPTS = {"oft_block_size": "int", "module_dropout": "float", "coft": "bool", "eps": "float",
             "block_share": "bool", "use_cayley_neumann": "bool", "num_cayley_neumann_terms": "int",
             "init_weights": "bool"}
_BOFT_OPTS = {"boft_block_size": "int", "boft_block_num": "int", "boft_n_butterfly_factor": "int",
              "boft_dropout": "float", "init_weights": "bool"}


def build_loha(cfg: "TrainConfig", options: dict) -> LoHaConfig:
    """LoHa (arXiv:2108.06098) on all linear layers; ``--rank`` 8 and ``--lora-alpha`` 16 by default
    (the parameters of LoRA r=16, scale 2). Default lr 3e-3: one factor of the Hadamard product
    starts at 0, so LoHa moves slower than LoRA at LoRA's 1e-3 (see LR_LOHA). Options:
    ``rank_dropout``, ``module_dropout``, ``use_effective_conv2d``, ``init_weights``."""
    return LoHaConfig(r=int(cfg.r), alpha=float(cfg.lora_alpha), target_modules=_targets(cfg.target_modules)
                      or "all-linear", **_opts(options, _LYCORIS_OPTS))


def build_lokr(cfg: "TrainConfig", options: dict) -> LoKrConfig:
    """LoKr (arXiv:2309.14859) on all linear layers, ``--rank``/``--lora-alpha`` as LoRA's; default lr
    3e-3 (its Kronecker factors hold ~6% of LoRA's parameters; see LR_LOKR). Options:
    ``decompose_both``, ``decompose_factor``, ``rank_dropout``, ``rank_dropout_scale``,
    ``module_dropout``, ``use_effective_conv2d``, ``init_weights`` (true | false | lycoris)."""
    kw = _opts(options, _LOKR_OPTS)
    if "init_weights" in kw and str(kw["init_weights"]).lower() != "lycoris":
        kw["init_weights"] = _opt_bool(kw, "init_weights")
    return LoKrConfig(r=int(cfg.r), alpha=float(cfg.lora_alpha), target_modules=_targets(cfg.target_modules)
                      or "all-linear", **kw)


def build_vera(cfg: "TrainConfig", options: dict) -> VeraConfig:
    """VeRA (arXiv:2310.11454) on all linear layers; ``--rank`` 256 by default (PEFT's and the
    paper's scale). Default lr 2e-2: only two scaling vectors per layer train, which want large steps
    (see LR_VERA). Options: ``projection_prng_key``, ``save_projection``, ``vera_dropout``, ``d_initial``."""
    return VeraConfig(r=int(cfg.r), target_modules=_targets(cfg.target_modules) or "all-linear",
                      **_opts(options, _VERA_OPTS))


def run_steps(cfg: "TrainConfig") -> int:
    """The optimizer steps a run will take when its data is the default task (``--max-steps`` when
    given); with ``--data`` an estimate that the training loop corrects (AdaLoRA's schedule follows)."""
    per_epoch = math.ceil(math.ceil(cfg.task_train_size / cfg.batch_size) / cfg.grad_accum)
    return int(cfg.max_steps or per_epoch * cfg.epochs)


def build_adalora(cfg: "TrainConfig", options: dict) -> AdaLoraConfig:
    """AdaLoRA (arXiv:2303.10512) on all linear layers: ``--rank`` is ``init_r`` (12 by default,
    PEFT's) and ``--lora-alpha`` 24 (scale 2 at init_r 12); ``target_r`` 8. The schedule takes the
    run's optimizer steps ``T`` (``total_step``): no pruning for the first ``tinit = T // 10`` steps,
    the pattern fixed for the last ``tfinal = T // 5``, an allocation every step (``deltaT`` 1).
    Default lr 5e-3: the singular values start at 0 and the vectors at scale 0.02, so 1e-3 barely
    moves in 30 steps (see LR_ADALORA). Options: ``target_r``, ``tinit``, ``tfinal``, ``deltaT``,
    ``beta1``, ``beta2``, ``orth_reg_weight``, ``total_step``."""
    kw = _opts(options, _ADALORA_OPTS)
    total = kw.pop("total_step", None) or run_steps(cfg)
    kw.setdefault("tinit", total // 10)
    kw.setdefault("tfinal", total // 5)
    return AdaLoraConfig(init_r=int(cfg.r), lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout),
                         target_modules=_targets(cfg.target_modules) or "all-linear", total_step=total, **kw)


def build_oft(cfg: "TrainConfig", options: dict) -> OFTConfig:
    """OFT (arXiv:2306.07280) on all linear layers, blocks of ``oft_block_size`` 32 (PEFT's default);
    default lr 1e-3, LoRA's: its loss falls as fast (see LR_OFT). Options: ``oft_block_size``, ``module_dropout``, ``coft``, ``eps``, ``block_share``,
    ``use_cayley_neumann``, ``num_cayley_neumann_terms``, ``init_weights``."""
    return OFTConfig(target_modules=_targets(cfg.target_modules) or "all-linear", **_opts(options, _OFT_OPTS))


def build_boft(cfg: "TrainConfig", options: dict) -> BOFTConfig:
    """BOFT (arXiv:2311.06243) on all linear layers; by default blocks of 8 and 2 butterfly factors
    (PEFT's defaults, 4 and 1, are plain block-diagonal OFT with tiny blocks); default lr 1e-3,
    LoRA's (see LR_BOFT). Options:
    ``boft_block_size``, ``boft_block_num``, ``boft_n_butterfly_factor``, ``boft_dropout``, ``init_weights``."""
    kw = _opts(options, _BOFT_OPTS)
    if kw.get("boft_block_num") and "boft_block_size" not in kw:
        kw["boft_block_size"] = 0
    kw.setdefault("boft_block_size", 8)
    kw.setdefault("boft_n_butterfly_factor", 2)
    return BOFTConfig(target_modules=_targets(cfg.target_modules) or "all-linear", **kw)


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
_RANKED = frozenset({"r", "lora_alpha", "target_modules"})
# Default peak learning rates of the reparameterisations, from 30-step checks on the default task
# (SmolLM2-135M, batch 4, warm-up 3, cosine, bf16 autocast, seed 0; mean loss of the first -> last 5
# steps, LoRA r=16 at 1e-3 for reference: 3.37 -> 0.37). LoHa starts slower than LoRA (one factor of
# a product at 0): 1e-3 4.57 -> 1.34, 3e-3 4.33 -> 0.47. LoKr: 1e-3 -> 0.63, 3e-3 -> 0.39. VeRA
# trains two scaling vectors per layer: 1e-2 -> 0.97, 2e-2 -> 0.50, 3e-2 -> 0.41 (2e-2 taken, a margin
# for the longer run). AdaLoRA starts from E = 0 and singular vectors of scale 0.02: 1e-3 -> 3.09,
# 5e-3 -> 0.42, 1e-2 -> 0.56. OFT 1e-3 -> 0.65 and BOFT 1e-3 -> 0.55 fall like LoRA.
LR_LOHA = LR_LOKR = 3e-3
LR_VERA = 2e-2
LR_ADALORA = 5e-3
LR_OFT = LR_BOFT = 1e-3

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
    # the reparameterisations: lr chosen on the default task (see each builder and the README's table)
    Preset("loha", build_loha, lr=LR_LOHA, options=tuple(_LYCORIS_OPTS), uses=_RANKED,
           field_defaults={"r": 8, "lora_alpha": 16}),
    Preset("lokr", build_lokr, lr=LR_LOKR, options=tuple(_LOKR_OPTS), uses=_RANKED),
    Preset("vera", build_vera, lr=LR_VERA, options=tuple(_VERA_OPTS), uses=frozenset({"r", "target_modules"}),
           field_defaults={"r": 256}),
    Preset("adalora", build_adalora, lr=LR_ADALORA, options=tuple(_ADALORA_OPTS), uses=_LORA_FIELDS,
           field_defaults={"r": 12, "lora_alpha": 24}),
    Preset("oft", build_oft, lr=LR_OFT, options=tuple(_OFT_OPTS), uses=_TARGETS),
    Preset("boft", build_boft, lr=LR_BOFT, options=tuple(_BOFT_OPTS), uses=_TARGETS),
    Preset("full", build_full, lr=FULL_LR, prepare=prepare_full, trains_base=True),
):
    register_preset(_preset)
