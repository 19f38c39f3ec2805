"""The training job as one Python call: :func:`train`, which the ``deltatune train`` command also runs.

``deltatune.train`` is this function: the package :mod:`deltatune.train` is callable (see its
``__init__``), so ``deltatune.train(...)`` works whatever has been imported before.

    import deltatune

    rows = [{"prompt": "Capital of France?", "completion": "Paris"}, ...]   # any row shape of --data
    report = deltatune.train(data=rows, out="runs/capitals", max_steps=60, lr=5e-4)
    report["metric_after"]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Union

from .config import TrainConfig, UsageError, build_config, read_yaml, validate
from .pipeline import MemoryData, train_session


def _is_rows(value) -> bool:
    return value is not None and not isinstance(value, (str, bytes, os.PathLike))


def options_of(config: Union[None, TrainConfig, dict, str, os.PathLike]) -> dict:
    """The options a ``config`` argument sets: a :class:`TrainConfig` (its fields that differ from the
    defaults), a dict of options, or the path of a YAML options file.

    Raises:
        OptionError: the YAML file is missing or not a mapping. UsageError: another type.
    """
    if config is None:
        return {}
    if isinstance(config, TrainConfig):
        defaults = TrainConfig()
        return {k: v for k, v in config.to_dict().items() if v != getattr(defaults, k)}
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return read_yaml(os.fspath(config))
    raise UsageError(f"config must be a TrainConfig, a dict of options or a YAML file path, got {type(config).__name__}")


def train(data: Any = None, *, eval_data: Any = None, config: Union[None, TrainConfig, dict, str] = None,
          log: Optional[Callable] = print, progress: Optional[bool] = None, return_session: bool = False,
          **options) -> dict:
    """Run a training job, as ``deltatune train`` does; return the report (``report.json``'s content).

    Args:
        data: None (the default word-inflection task), the path of a JSONL/JSON/CSV/Parquet file, or the
            rows themselves: a list of dicts (or any iterable of mappings, e.g. a ``datasets.Dataset``)
            in any shape ``--data`` takes (``messages`` | ``prompt`` + ``completion`` | ``instruction``
            + ``input`` + ``output`` | ``text``). Rows held in memory are written into ``out`` as
            ``data.jsonl`` (the report names that file, so ``deltatune eval --adapter OUT`` can score
            the same held-out rows).
        eval_data: held-out rows or file (default: split off ``data`` by ``val_fraction``).
        config: options to start from: a :class:`TrainConfig`, a dict, or a YAML file path (as
            ``--config``); ``options`` win over it.
        log: where progress lines go (``print``; None: silent). progress: the progress bar (default:
            the option ``progress``).
        return_session: return ``{"report", "model", "tokenizer", "evaluator", "trainer"}`` instead
            of the report, keeping the trained model in memory.
        **options: any option of ``deltatune train`` by its field name or flag name
            (``max_steps=100``, ``method="qlora"``, ``lr=2e-4``, ``rank=8``, ``out="runs/x"``,
            ``overwrite=True``, ``method_options={"num_virtual_tokens": 32}``, ``report_to="tensorboard"``).

    Returns:
        The report dict (see :data:`deltatune.train.report.REPORT_FIELDS` and the README).

    Raises:
        OptionError: an unknown option (the nearest names, and the deltatune name of a common name from
            other tools, e.g. ``learning_rate`` -> ``lr``) or a bad value.
        DataError: unreadable rows or file (the row is named). UsageError: an existing ``out`` without
            ``overwrite``, an unknown method, a model that is not on this machine, ...
    """
    if isinstance(config, TrainConfig) and not options and data is None and eval_data is None:
        cfg = dataclasses.replace(config)  # as given (the command line builds it with build_config)
        validate(cfg)
        session = train_session(cfg, log, progress)
        return session if return_session else session["report"]
    values = options_of(config)
    if data is not None:
        values["data"] = None if _is_rows(data) else os.fspath(data)
    if eval_data is not None:
        values["eval_data"] = None if _is_rows(eval_data) else os.fspath(eval_data)
    flags = dict(options)
    cfg = build_config(values, flags)
    rows = None
    if _is_rows(data):
        rows = MemoryData(list(data), list(eval_data) if _is_rows(eval_data) else None)
        cfg = dataclasses.replace(cfg, data=None, eval_data=None if _is_rows(eval_data) else cfg.eval_data)
    elif _is_rows(eval_data):
        raise UsageError("eval_data rows in memory need data rows in memory too (or give eval_data as a file path)")
    session = train_session(cfg, log, progress, rows=rows)
    return session if return_session else session["report"]
