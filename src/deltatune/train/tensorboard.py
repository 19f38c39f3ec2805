"""``--report-to tensorboard``: the run's metrics as TensorBoard event files in ``--out``, beside
``metrics.jsonl`` (``tensorboard --logdir runs`` shows every run folder as a run).

Every row :class:`deltatune.train.report.MetricsLog` writes goes to the sinks too. Scalars (the names
transformers' Trainer uses), at the optimizer step:

* ``train/loss``, ``train/learning_rate``, ``train/grad_norm`` (when clipping), ``train/tokens_per_second``
  (real tokens of the step over its seconds), for every step;
* ``eval/loss`` and ``eval/<metric>`` (``eval/exact_match`` or ``eval/token_accuracy``), for every
  evaluation (step 0 is the base model).

Needs the ``tensorboard`` package (``pip install 'deltatune[tensorboard]'``); its own writer is used,
TensorFlow is not needed.
"""

from __future__ import annotations

import importlib.util
import math
import time

REPORT_TO = ("none", "tensorboard")


def check_report_to(value: str) -> list[str]:
    """The sinks named by ``--report-to`` (``none``, ``tensorboard``, or a comma-separated list).

    Raises:
        ValueError: an unknown name (the known ones are listed), or ``tensorboard`` without the
            tensorboard package (the message says what to install).
    """
    names = [v.strip().lower() for v in str(value).split(",") if v.strip()]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise ValueError(f"--report-to {bad[0]!r} is not known: use {' or '.join(REPORT_TO)}")
    names = [n for n in names if n != "none"]
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--report-to tensorboard needs the tensorboard package: pip install 'deltatune[tensorboard]'")
    return names


class TensorBoardSink:
    """Writes metric rows as TensorBoard scalar events into ``logdir`` (see the module docstring)."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(logdir)
        self.path = self.writer._file_name

    def _scalars(self, step: int, values: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        vals = [Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if vals:
            self.writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=vals)))

    def write(self, row: dict) -> None:
        kind, step = row.get("kind"), row.get("step")
        if step is None:
            return
        if kind == "train":
            self._scalars(step, {"train/loss": row.get("loss"), "train/learning_rate": row.get("lr"),
                                 "train/grad_norm": row.get("grad_norm"),
                                 "train/tokens_per_second": row.get("tokens_per_s")})
        elif kind == "eval":
            self._scalars(step, {"eval/loss": row.get("eval_loss"),
                                 f"eval/{row.get('metric_name') or 'metric'}": row.get("metric")})

    def close(self) -> None:
        self.writer.close()


def metric_sinks(report_to: str, out: str) -> list:
    """The sinks of ``--report-to`` writing into ``out`` (empty for ``none``)."""
    sinks: list = []
    for name in check_report_to(report_to):
        if name == "tensorboard":
            sinks.append(TensorBoardSink(out))
    return sinks


def read_scalars(logdir: str) -> dict:
    """``{tag: [(step, value), ...]}`` of the TensorBoard event files in ``logdir`` (tests, notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags().get("scalars", [])}


__all__ = ["REPORT_TO", "TensorBoardSink", "check_report_to", "metric_sinks", "read_scalars"]
