"""Run outputs: ``metrics.jsonl`` (one JSON object per line), ``curves.png``, ``report.json`` and the
table printed at the end.

``metrics.jsonl`` lines have ``"kind": "train"`` (``step``, ``loss``, ``lr``, ``grad_norm``,
``targets``, ``tokens``, ``seconds``, ``tokens_per_s``, ``elapsed_s``) or ``"kind": "eval"`` (``step``,
``metric_name``, ``metric``, ``eval_loss``, ``n``). Steps are optimizer steps; step 0 is the base model
before training.

``metrics.jsonl`` survives a crash: each line is written whole by one ``write`` call, so a killed run
leaves only whole lines, and a resumed run first cuts the file back to the lines its checkpoint
had counted (:class:`MetricsLog` ``keep_lines``), so no step or evaluation is there twice.
``curves.png`` and ``report.json`` are written atomically.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import sys
from typing import Optional

from .._io import atomic_write_bytes, write_all

REPORT_FIELDS = (
    "method", "metric_name", "metric_before", "metric_after", "trainable_params", "total_params",
    "peak_rss_bytes", "wall_seconds", "train_tokens", "perplexity_before", "perplexity_after",
)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes (``ru_maxrss`` is KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class MetricsLog:
    """Appends JSON lines to ``path``, each by one ``write`` call (a crashed run keeps whole lines), and
    hands every row to ``sinks`` too (objects with ``write(row)`` and ``close()``, e.g. the TensorBoard
    writer of ``--report-to tensorboard``).

    ``keep_lines``: continue an existing file (a resumed run): its first ``keep_lines`` whole lines stay,
    read back into :attr:`rows`, and the rest (what the interrupted process wrote after its last
    checkpoint) goes, atomically; None starts an empty file.
    """

    def __init__(self, path: str, keep_lines: Optional[int] = None, sinks=()):
        self.path = path
        self.rows: list = []
        self.sinks = list(sinks)
        if keep_lines is None:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
            return
        kept = []
        try:
            with open(path, "rb") as fh:
                for line in fh:
                    if len(kept) >= keep_lines or not line.endswith(b"\n"):
                        break
                    try:
                        self.rows.append(json.loads(line))
                    except ValueError:
                        break
                    kept.append(line)
        except FileNotFoundError:
            pass
        atomic_write_bytes(path, b"".join(kept))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        write_all(self._fd, (json.dumps(row) + "\n").encode())  # one write: a crash leaves whole lines
        for s in self.sinks:
            s.write(row)

    def sync(self) -> int:
        """Make the lines written so far durable; return how many there are (a checkpoint records it)."""
        os.fsync(self._fd)
        return len(self.rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for s in self.sinks:
            s.close()
        self.sinks = []


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(rows: list[dict], path: str, title: str = "") -> Optional[str]:
    """Draw training loss (left axis) and the eval metric (right axis) against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tr = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    ev = [r for r in rows if r.get("kind") == "eval" and r.get("metric") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], color="tab:blue", lw=1, label="train loss")
    evl = [r for r in ev if r.get("eval_loss") is not None]
    if evl:
        ax.plot([r["step"] for r in evl], [r["eval_loss"] for r in evl], "o--", color="tab:cyan", ms=4,
                label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax2 = ax.twinx()
    if ev:
        name = ev[0].get("metric_name", "metric")
        ax2.plot([r["step"] for r in ev], [r["metric"] for r in ev], "s-", color="tab:red", ms=5, label=name)
        ax2.set_ylabel(name)
        ax2.set_ylim(0, 1.02)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_report(path: str, report: dict) -> None:
    missing = [k for k in REPORT_FIELDS if k not in report]
    if missing:
        raise ValueError(f"report is missing fields {missing}")
    atomic_write_bytes(path, (json.dumps({k: _clean(v) for k, v in report.items()}, indent=2) + "\n").encode())


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def counted(n: int, noun: str) -> str:
    """``"1 row"``, ``"3 rows"``: a count with its noun in the right number (plural: noun + s)."""
    return f"{n:,d} {noun}" + ("" if n == 1 else "s")


def format_table(report: dict) -> str:
    """The short table printed at the end of ``deltatune train``."""
    name = report.get("metric_name") or "metric"

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"{'':<26}{'before':>12}{'after':>12}",
        f"{name:<26}{pct(report.get('metric_before')):>12}{pct(report.get('metric_after')):>12}",
        f"{'perplexity (chitchat)':<26}{_fmt(report.get('perplexity_before')):>12}"
        f"{_fmt(report.get('perplexity_after')):>12}",
    ]
    by_before, by_after = report.get("metric_by_form_before") or {}, report.get("metric_by_form") or {}
    for form in sorted(set(by_before) | set(by_after)):
        lines.append(f"{'  ' + form:<26}{pct(by_before.get(form)):>12}{pct(by_after.get(form)):>12}")
    t, n = report.get("trainable_params"), report.get("total_params")
    rows = [
        ("method", report.get("method")),
        ("trainable params", f"{_fmt(t)} of {_fmt(n)} ({100 * t / max(n, 1):.2f}%)" if t is not None and n else "-"),
        ("steps", _fmt(report.get("steps"))),
        ("train tokens", _fmt(report.get("train_tokens"))),
        ("tokens/s (train)", _fmt(report.get("train_tokens_per_s"))),
        ("wall time", f"{report.get('wall_seconds', 0):.0f} s"),
        ("peak RSS", f"{report.get('peak_rss_bytes', 0) / 2**20:,.0f} MiB"),
        ("model folder" if report.get("saved") == "model" else "adapter", report.get("out")),
    ]
    data = report.get("data") if isinstance(report.get("data"), dict) else {}  # a joint run's task: its file
    if data.get("truncated") or data.get("dropped_no_target"):
        rows.insert(3, ("cut at max_seq_len", f"{data.get('cut_harmless', 0):,d} with every answer token kept, "
                                             f"{data.get('cut_answer', 0):,d} lost answer tokens, "
                                             f"{data.get('dropped_no_target', 0):,d} dropped (no target left)"))
    for k in sorted(report):
        if k not in REPORT_FIELDS and k in report.get("extra_fields", []):
            rows.append((k, _fmt(report[k])))
    return "\n".join(lines + [f"{k:<26}{v}" for k, v in rows])
