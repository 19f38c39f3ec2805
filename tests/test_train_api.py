"""deltatune.train(...): the whole training job from Python, on rows held in memory (no file), the same
job as the command line (same adapter, bit for bit), callable after any import order; its messages for
small data sets (held-out warning, epochs implied by max_steps) and its option errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from conftest import make_dv, make_tl, make_tt, model_folder
from deltatune.cli import main
from deltatune.train.config import OptionError, UsageError
from deltatune.train.data import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    folder = model_folder(root / "tl", make_tl(), make_tt())
    rows = [{"messages": m} for m in make_dv(24)]
    return folder, rows, root


OPTS = dict(max_steps=3, batch_size=4, eval_size=4, eval_every=0, ppl_size=0, threads=1, progress=False,
            rank=4, lora_alpha=8, lr=1e-2, plot=False)


def test_train_on_rows_in_memory_is_the_command_line_job(tiny, capsys):
    folder, rows, root = tiny
    lines = []
    report = deltatune.train(data=rows, model=folder, out=str(root / "api"), log=lines.append, **OPTS)
    out = root / "api"
    assert report == json.load(open(out / "report.json"))
    assert report["steps"] == 3 and report["method"] == "lora" and report["metric_name"] == "exact_match"
    # the rows were written beside the adapter, and the report names that file
    assert report["config"]["data"] == str(out / "data.jsonl")
    assert [json.loads(x) for x in open(out / "data.jsonl")] == rows
    # the command line on a file of the same rows trains the same adapter, bit for bit
    with open(root / "rows.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    argv = ["train", "--model", folder, "--data", str(root / "rows.jsonl"), "--out", str(root / "cli"), "--max-steps",
            "3", "--batch-size", "4", "--eval-size", "4", "--eval-every", "0", "--ppl-size", "0", "--threads", "1",
            "--no-progress", "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--no-plot"]
    assert main(argv) == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(root / "cli" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report["metric_after"] == json.load(open(root / "cli" / "report.json"))["metric_after"]
    # `deltatune eval --adapter` scores the run's held-out rows again, from the written file
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--model", folder, "--json", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == report["eval_examples"] and res["metric"] == report["metric_after"]


def test_messages_for_small_data_sets(tiny):
    folder, rows, root = tiny
    lines = []
    deltatune.train(data=rows, model=folder, out=str(root / "small"), log=lines.append, val_fraction=0.2, **OPTS)
    # 24 rows, 20% held out but at most eval_size = 4: 4 held-out rows (under 10: a warning that names
    # --eval-data), 20 training rows
    assert "data: 24 rows from memory: 20 training rows, 4 held-out rows" in lines
    warn = [x for x in lines if x.startswith("warning: the held-out split has only 4 rows")]
    assert len(warn) == 1 and "--eval-data" in warn[0] and "one row = 25%" in warn[0]
    assert "--max-steps 3: 3 steps see 12 examples = 0.6 epochs of the 20 training examples" in lines
    lines.clear()
    deltatune.train(data=rows[:20], eval_data=rows[20:], model=folder, out=str(root / "own-eval"),
                    log=lines.append, **{**OPTS, "max_steps": 30})
    assert not any(x.startswith("warning: the held-out") for x in lines)  # the user gave the held-out rows
    note = [x for x in lines if x.startswith("--max-steps 30:")]
    assert note == ["--max-steps 30: 30 steps see 120 examples = 6 epochs of the 20 training examples (each example "
                    "many times: watch the held-out loss for memorisation)"]
    assert [json.loads(x) for x in open(root / "own-eval" / "eval_data.jsonl")] == rows[20:]


def test_return_session_keeps_the_model(tiny):
    folder, rows, root = tiny
    sess = deltatune.train(data=rows, model=folder, out=str(root / "sess"), log=None, return_session=True, **OPTS)
    assert sess["report"]["steps"] == 3 and deltatune.adapter_names(sess["model"]) == ["default"]


def test_option_and_data_errors(tiny):
    folder, rows, root = tiny
    with pytest.raises(OptionError, match="'learning_rate'.*deltatune calls it 'lr'"):
        deltatune.train(data=rows, model=folder, out=str(root / "e1"), learning_rate=1e-3)
    with pytest.raises(DataError, match="row 2 is a str"):
        deltatune.train(data=[{"text": "a"}, "b"], model=folder, out=str(root / "e2"))
    with pytest.raises(DataError, match="row 1: no known fields"):
        deltatune.train(data=[{"question": "a", "answer": "b"}], model=folder, out=str(root / "e3"))
    with pytest.raises(UsageError, match="eval_data rows in memory need data rows"):
        deltatune.train(eval_data=rows, model=folder, out=str(root / "e4"))
    assert not any((root / f"e{i}").exists() for i in range(1, 5))


def test_a_users_data_jsonl_in_out_is_never_replaced(tiny):
    folder, rows, root = tiny
    with open(root / "file.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    deltatune.train(data=str(root / "file.jsonl"), model=folder, out=str(root / "mine"), log=None, **OPTS)
    assert not (root / "mine" / "data.jsonl").exists()  # a file run writes no copy of its data
    (root / "mine" / "data.jsonl").write_text("my file\n")  # the user's, in deltatune's folder
    with pytest.raises(UsageError, match="data.jsonl deltatune did not write"):
        deltatune.train(data=rows, model=folder, out=str(root / "mine"), overwrite=True, log=None, **OPTS)
    assert (root / "mine" / "data.jsonl").read_text() == "my file\n"
    assert (root / "mine" / "report.json").exists()  # refused before anything was deleted


@pytest.mark.parametrize("first", ["import deltatune", "import deltatune.train.pipeline", "import deltatune.train.config",
                                   "from deltatune.train import api", "import deltatune.cli"])
def test_deltatune_train_is_the_job_after_any_import_order(first):
    code = (f"{first}\nimport deltatune\nimport deltatune.train.report\nfrom deltatune import train\n"
            "from deltatune.train.api import train as job\n"
            "assert callable(deltatune.train) and train is deltatune.train\n"
            "try:\n    deltatune.train(data=[{'text': 'x'}], bogus_option=1)\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OptionError unknown option 'bogus_option'")
