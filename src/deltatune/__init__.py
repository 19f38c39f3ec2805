"""deltatune: parameter-efficient fine-tuning for PyTorch, in the Hugging Face PEFT adapter format.

Public API (all functions take the model and change it in place; none wraps it)::

    inject(model, config, adapter_name="default")       -> model
    set_adapter / disable_adapter / delete_adapter / active_adapters / adapter_names / get_record
    adapter_rows(model, names)                           mixed batches (also model(..., adapter_names=[...]))
    add_weighted_adapter(model, adapters, weights, name) combine LoRA adapters (PEFT's combination types)
    extract_lora(base, tuned, r)                         a LoRA adapter from a fully fine-tuned model
    merge / unmerge / merge_and_unload / unload
    save_adapter(model, dir) / load_adapter(model, dir)
    print_trainable_parameters(model)
    train(data=rows_or_file, out=dir, **options) -> report   (the whole training job, as `deltatune train`)
"""

from . import methods  # noqa: F401  (registers the built-in methods)
from .integrations import transformers as _transformers  # noqa: F401  (registers transformers' model knowledge)
from .adapters import AdapterRecord, LayerAdapter, get_record
from .combine import COMBINATION_TYPES, add_weighted_adapter
from .config import AdapterConfig, config_from_dict, load_config
from .extract import ExtractionReport, extract_lora
from .formats.peft import adapter_state_dict, load_adapter, save_adapter
from .inject import (
    active_adapters,
    adapter_names,
    count_parameters,
    get_config,
    inject,
    parameter_groups,
    print_trainable_parameters,
)
from .lifecycle import delete_adapter, disable_adapter, merge_and_unload, set_adapter, unload
from .merge import merge, merged_adapters, unmerge
from .methods.adalora import AdaLoraConfig
from .methods.adaption_prompt import AdaptionPromptConfig
from .methods.boft import BOFTConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.lycoris import LoHaConfig, LoKrConfig
from .methods.oft import OFTConfig
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptEncoderConfig, PromptTuningConfig
from .methods.vera import VeraConfig
from .quant import quant_stats, quantize_base
from . import train  # noqa: F401  (the callable package: deltatune.train(...) runs a training job)
from .routing import BASE_ROW, adapter_rows

__version__ = "0.1.0"

__all__ = [
    "quantize_base",
    "quant_stats",
    "AdapterConfig",
    "LoraConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "VeraConfig",
    "AdaLoraConfig",
    "OFTConfig",
    "BOFTConfig",
    "BottleneckConfig",
    "PromptTuningConfig",
    "PromptEncoderConfig",
    "PrefixTuningConfig",
    "AdaptionPromptConfig",
    "inject",
    "set_adapter",
    "disable_adapter",
    "adapter_rows",
    "BASE_ROW",
    "delete_adapter",
    "active_adapters",
    "adapter_names",
    "get_config",
    "get_record",
    "AdapterRecord",
    "LayerAdapter",
    "parameter_groups",
    "merge",
    "unmerge",
    "merge_and_unload",
    "merged_adapters",
    "unload",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "print_trainable_parameters",
    "add_weighted_adapter",
    "extract_lora",
    "ExtractionReport",
    "COMBINATION_TYPES",
    "count_parameters",
    "config_from_dict",
    "load_config",
    "train",
]
