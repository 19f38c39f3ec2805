"""transformers ``Trainer`` and TRL ``SFTTrainer`` with a deltatune-adapted model (no ``peft_config``).

Two pieces of glue:

* **``save_pretrained`` of an adapted model.** While a transformers model carries deltatune
  adapters, ``model.save_pretrained(dir)`` writes the adapter(s) in the PEFT format
  (``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft``'s ``PeftModel.save_pretrained``
  does: extra adapters into ``dir/<name>/``), never a ``model.safetensors`` whose adapter keys a
  reload would silently drop. ``model.save_pretrained(dir, merged=True)`` writes the merged plain
  transformers model instead (the model in memory is not changed). deltatune installs this on the
  model when its first adapter is injected (:func:`install_save_pretrained`, registered in
  ``GEOMETRY.on_first_adapter``) and removes it with the last adapter, so ``Trainer``'s checkpoints
  (``checkpoint-N/``) and its final ``save_model()`` write the adapter, whatever trainer calls it.
* **Resuming.** ``Trainer._load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and
  ``_load_best_model`` (``load_best_model_at_end``) read an adapter only into a ``peft.PeftModel``;
  for any other model they look for full weights and fail ("Can't find a checkpoint index"). The
  mixin :class:`AdapterTrainerMixin` loads the checkpoint's adapter folders into the model's
  deltatune adapters instead (values copied into the existing adapters, which stay trainable);
  :func:`adapter_trainer` makes the subclass of any trainer class::

      from transformers import Trainer
      from deltatune.integrations.hf_trainer import adapter_trainer

      trainer = adapter_trainer(Trainer)(model=model, args=args, train_dataset=ds)
      trainer.train(resume_from_checkpoint=True)

transformers is imported only when a trainer class is made; the rest reads transformers'
conventions (``save_pretrained`` on the model class, ``config``) without importing it.
"""

from __future__ import annotations

import copy
import os
import types
import weakref
from typing import Optional

from torch import nn

from ..adapters import AdapterState, get_state
from ..formats.peft import WEIGHTS_NAME, WEIGHTS_NAME_BIN, load_adapter, save_adapter
from ..lifecycle import merge_and_unload

SAVE_HOOK = "save_pretrained"  # the state.model_hooks entry of the instance's save_pretrained
# keyword arguments transformers' Trainer (or a user) may pass to a model's save_pretrained that mean
# nothing for an adapter folder: accepted and ignored (the adapter is read from the model itself)
_IGNORED_FOR_ADAPTER = ("state_dict", "safe_serialization", "max_shard_size", "save_function", "variant",
                        "token", "save_peft_format")


class _InstanceAttribute:
    """The handle of an attribute set on one model instance: ``remove()`` deletes it again."""

    def __init__(self, model: nn.Module, name: str):
        self._model = weakref.ref(model)
        self._name = name

    def __deepcopy__(self, memo):  # a deep copy of the model gets a handle on the copy, not on the original
        m = self._model()
        return _InstanceAttribute(memo.get(id(m), m), self._name)

    def remove(self) -> None:
        m = self._model()
        if m is not None:
            m.__dict__.pop(self._name, None)


def install_save_pretrained(model: nn.Module, st: AdapterState) -> None:
    """``on_first_adapter`` setup: give an adapted transformers model (one whose class has
    ``save_pretrained``) the instance method :func:`adapted_save_pretrained`; its handle goes into
    ``state.model_hooks`` and is removed with the last adapter (the class's own method is back)."""
    if SAVE_HOOK in st.model_hooks or not callable(getattr(type(model), "save_pretrained", None)):
        return
    model.__dict__["save_pretrained"] = types.MethodType(adapted_save_pretrained, model)
    st.model_hooks[SAVE_HOOK] = _InstanceAttribute(model, "save_pretrained")


def adapted_save_pretrained(model: nn.Module, save_directory: str, *, merged: bool = False,
                            selected_adapters: Optional[list] = None, save_embedding_layers="auto",
                            is_main_process: bool = True, push_to_hub: bool = False, **kwargs) -> None:
    """``model.save_pretrained`` while the model carries deltatune adapters.

    Default: the adapters in the PEFT format (:func:`deltatune.save_adapter`): every adapter (the
    first, or the one named "default", into ``save_directory``, each other into
    ``save_directory/<name>/``), or only ``selected_adapters``. ``merged=True``: the merged plain model
    as a transformers folder (the active adapters merged into a copy of the model, which then goes to
    the class's own ``save_pretrained`` with ``kwargs``; the model in memory is unchanged, and the copy
    needs as much memory again). ``is_main_process=False`` writes nothing (as transformers).

    Raises:
        ValueError: ``push_to_hub`` (deltatune never uploads); ``merged=True`` with an adapter that
            cannot be merged (prompt methods, bottleneck adapters: the reason is named).
        TypeError: a keyword that neither an adapter folder nor ``merged=True`` takes.
        KeyError: an unknown name in ``selected_adapters``.
    """
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True): deltatune never uploads; save locally, then upload "
                         "the folder yourself")
    if merged:
        if is_main_process:
            save_merged(model, save_directory, **kwargs)
        return
    unknown = sorted(k for k in kwargs if k not in _IGNORED_FOR_ADAPTER)
    if unknown:
        raise TypeError(f"save_pretrained() of a model with deltatune adapters writes the adapter (PEFT format) and "
                        f"takes no {', '.join(map(repr, unknown))}; pass merged=True to write the merged model")
    if not is_main_process:
        return
    if selected_adapters is None:
        save_adapter(model, save_directory, save_embedding_layers=save_embedding_layers)
        return
    st = get_state(model)
    names = list(selected_adapters)
    for n in names:
        if st is None or n not in st.records:
            raise KeyError(f"no adapter named {n!r}; this model has {list(st.records) if st else []}")
    root = "default" if "default" in names else names[0]
    for n in names:
        save_adapter(model, save_directory if n == root else os.path.join(save_directory, n), n,
                     save_embedding_layers=save_embedding_layers)


def save_merged(model: nn.Module, save_directory: str, **kwargs) -> None:
    """Write the model with its active adapters merged, as a plain transformers folder, leaving
    ``model`` as it is (a deep copy is merged with :func:`deltatune.merge_and_unload` and saved with
    the class's ``save_pretrained(save_directory, **kwargs)``).

    Raises:
        ValueError: an active adapter cannot be merged (the message names it and why).
    """
    twin = copy.deepcopy(model)
    merge_and_unload(twin)  # removes the instance save_pretrained with the last adapter
    drop_gguf_quantizer(twin)
    for p in twin.parameters():
        p.requires_grad_(True)  # a plain model, as transformers would load it
    type(twin).save_pretrained(twin, save_directory, **kwargs)


def drop_gguf_quantizer(model: nn.Module) -> None:
    """A model loaded from a GGUF file is de-quantised on load, but transformers keeps its GGUF
    "quantizer", which refuses ``save_pretrained``; its weights are plain float tensors, so drop the
    marks (``hf_quantizer``, ``config.quantization_config``, ``quantization_method``)."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is not None and str(getattr(method, "value", method)).lower() == "gguf":
        model.hf_quantizer = None
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        if hasattr(model, "quantization_method"):
            try:
                del model.quantization_method
            except AttributeError:
                pass


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS_NAME)) or os.path.isfile(os.path.join(path, WEIGHTS_NAME_BIN))


def load_adapter_checkpoint(model: nn.Module, folder: str) -> list[str]:
    """Copy the adapter values of a checkpoint folder (as :func:`adapted_save_pretrained` wrote it)
    into the model's existing deltatune adapters; return the adapter names loaded.

    The first adapter (or "default") is read from ``folder``, each other one from ``folder/<name>``;
    the adapters keep their config and trainability (an adapter that was training stays trainable).

    Raises:
        FileNotFoundError: an adapter of the model has no folder there.
        ValueError: the folder's adapter does not fit (another config, shapes, keys: named).
    """
    st = get_state(model)
    names = list(st.records) if st is not None else []
    if not names:
        raise ValueError("the model has no deltatune adapters to restore")
    root = "default" if "default" in names else names[0]
    for n in names:
        d = folder if n == root else os.path.join(folder, n)
        if not is_adapter_folder(d):
            raise FileNotFoundError(f"checkpoint {folder} has no adapter {n!r} (no {WEIGHTS_NAME} in {d})")
    for n in names:
        rec = st.records[n]
        load_adapter(model, folder if n == root else os.path.join(folder, n), n,
                     is_trainable=not rec.config.inference_mode)
    return names


def _has_adapters(model) -> bool:
    st = get_state(model) if isinstance(model, nn.Module) else None
    return st is not None and bool(st.records)


class AdapterTrainerMixin:
    """Mixin for a transformers ``Trainer`` (or TRL trainer) subclass: checkpoints that hold a
    deltatune adapter are restored into the model's adapters (resume and ``load_best_model_at_end``);
    everything else goes to the trainer's own code. Put it first: ``class T(AdapterTrainerMixin, Trainer)``."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.model if model is None else model
        if _has_adapters(target) and is_adapter_folder(resume_from_checkpoint):
            load_adapter_checkpoint(target, resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = getattr(self.state, "best_model_checkpoint", None)
        if best and _has_adapters(self.model) and is_adapter_folder(best):
            load_adapter_checkpoint(self.model, best)
            return None
        return super()._load_best_model()


_CLASSES: dict = {}


def adapter_trainer(trainer_cls: type) -> type:
    """The subclass ``Adapter<Name>(AdapterTrainerMixin, trainer_cls)`` of a trainer class (made once
    per class), e.g. ``adapter_trainer(transformers.Trainer)`` or ``adapter_trainer(trl.SFTTrainer)``.

    Raises:
        TypeError: ``trainer_cls`` is not a class with ``_load_from_checkpoint`` (not a transformers trainer).
    """
    if not isinstance(trainer_cls, type) or not hasattr(trainer_cls, "_load_from_checkpoint"):
        raise TypeError(f"adapter_trainer() takes a transformers Trainer class (or a subclass such as "
                        f"trl.SFTTrainer), got {trainer_cls!r}")
    if issubclass(trainer_cls, AdapterTrainerMixin):
        return trainer_cls
    cls = _CLASSES.get(trainer_cls)
    if cls is None:
        cls = _CLASSES[trainer_cls] = type(f"Adapter{trainer_cls.__name__}", (AdapterTrainerMixin, trainer_cls),
                                           {"__module__": __name__, "__doc__": AdapterTrainerMixin.__doc__})
    return cls


def register(geometry) -> None:
    """Install :func:`install_save_pretrained` as a first-adapter setup of ``geometry``."""
    if install_save_pretrained not in geometry.on_first_adapter:
        geometry.on_first_adapter.append(install_save_pretrained)
