"""deltatune: parameter-efficient fine-tuning for PyTorch, in the Hugging Face PEFT adapter format.

Public API (all functions take the model and change it in place; none wraps it)::

    inject(model, config, adapter_name="default")       -> model
    set_adapter / disable_adapter / delete_adapter / active_adapters / adapter_names
    merge / unmerge / merge_and_unload / unload
    save_adapter(model, dir) / load_adapter(model, dir)
    print_trainable_parameters(model)
"""

from .config import AdapterConfig, config_from_dict, load_config
from .formats.peft import adapter_state_dict, load_adapter, save_adapter
from .inject import (
    active_adapters,
    adapter_names,
    count_parameters,
    delete_adapter,
    disable_adapter,
    get_config,
    inject,
    print_trainable_parameters,
    set_adapter,
)
from .merge import merge, merge_and_unload, merged_adapters, unload, unmerge
from .methods.lora import LoraConfig
from .quant import quant_stats, quantize_base
from .methods.ia3 import IA3Config
from .methods.bottleneck import BottleneckConfig
from .methods.adaption_prompt import AdaptionPromptConfig
from .methods.prompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

__version__ = "0.1.0"

__all__ = [
    "quantize_base",
    "quant_stats",
    "AdapterConfig",
    "LoraConfig",
    "IA3Config",
    "BottleneckConfig",
    "PromptTuningConfig",
    "PromptEncoderConfig",
    "PrefixTuningConfig",
    "AdaptionPromptConfig",
    "inject",
    "set_adapter",
    "disable_adapter",
    "delete_adapter",
    "active_adapters",
    "adapter_names",
    "get_config",
    "merge",
    "unmerge",
    "merge_and_unload",
    "merged_adapters",
    "unload",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "print_trainable_parameters",
    "count_parameters",
    "config_from_dict",
    "load_config",
]
