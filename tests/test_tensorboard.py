"""--report-to tensorboard: the run's loss, learning rate, tokens/s and evaluations as TensorBoard events
in --out beside metrics.jsonl, read back with tensorboard's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import json
import os

import pytest

from conftest import make_dv, make_tl, make_tt, model_folder
from deltatune.cli import main
from deltatune.train.config import OptionError, build_config
from deltatune.train.tensorboard import read_scalars

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorboard_events_match_metrics_jsonl(tmp_path, capsys):
    folder = model_folder(tmp_path / "tl", make_tl(), make_tt())
    with open(tmp_path / "d.jsonl", "w") as fh:
        for m in make_dv(24):
            fh.write(json.dumps({"messages": m}) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", folder, "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--eval-size", "4", "--eval-every", "2", "--ppl-size", "0", "--threads", "1",
                 "--no-progress", "--no-plot", "--rank", "4", "--lr", "1e-2", "--report-to", "tensorboard"]) == 0
    events = [f for f in os.listdir(out) if f.startswith("events.out.tfevents.")]
    assert len(events) == 1
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    sc = read_scalars(str(out))
    assert set(sc) == {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss",
                       "eval/exact_match"}
    for tag, key, rs in (("train/loss", "loss", train), ("train/learning_rate", "lr", train),
                         ("train/tokens_per_second", "tokens_per_s", train), ("eval/loss", "eval_loss", evals),
                         ("eval/exact_match", "metric", evals)):
        assert [s for s, _ in sc[tag]] == [r["step"] for r in rs], tag
        assert all(abs(v - r[key]) <= 1e-6 * max(1.0, abs(r[key])) for (_, v), r in zip(sc[tag], rs)), tag
    assert [s for s, _ in sc["eval/loss"]] == [0, 2, 4]
    # the warm-up's first step learns at lr / 10 (10 warm-up steps; --warmup-from-zero false, the default)
    assert abs(sc["train/learning_rate"][0][1] - 1e-3) < 1e-9 and sc["train/loss"][0][1] > 0
    marker = json.load(open(out / "deltatune-output.json"))
    assert events[0] in marker["files"]  # deltatune's own file: --overwrite may replace it


def test_report_to_values():
    assert build_config({}, {"report_to": "tensorboard"}).report_to == "tensorboard"
    assert build_config({"report_to": ["tensorboard"]}, {}).report_to == "tensorboard"
    assert build_config({}, {}).report_to == "none"
    with pytest.raises(OptionError, match="--report-to 'wandb' is not known: use none or tensorboard"):
        build_config({}, {"report_to": "wandb"})
