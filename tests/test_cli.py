"""The deltatune command on a tiny local model folder (TL + TT): train, eval, generate, merge, inspect,
options from YAML with flags winning, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from conftest import make_dv, make_tl, make_tt, model_folder, with_flags
from deltatune.cli import main
from deltatune.train.config import OptionError, TrainConfig, UsageError, build_config, read_yaml
from deltatune.train.report import REPORT_FIELDS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A transformers model folder (TL + TT) and a JSONL of 24 DV conversations."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = model_folder(root / "tl", make_tl(), make_tt())
    data = root / "dv.jsonl"
    with open(data, "w") as fh:
        for m in make_dv(24):
            fh.write(json.dumps({"messages": m}) + "\n")
    return model_dir, str(data)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def train_args(tiny, out, *extra):
    """The tiny run's flags; a flag of ``extra`` replaces the same flag here (a flag given twice is an error)."""
    model_dir, data = tiny
    return with_flags(["train", "--model", model_dir, "--data", data, "--out", str(out), "--max-steps", "3",
                       "--batch-size", "4", "--eval-size", "4", "--eval-every", "2", "--ppl-size", "0", "--threads",
                       "1", "--no-progress", "--val-fraction", "0.2"], *extra)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    assert main(train_args(tiny, out, "--rank", "4", "--lora-alpha", "8", "--lr", "1e-2")) == 0
    return str(out)


def test_train_writes_adapter_report_metrics_and_curves(trained):
    files = set(os.listdir(trained))
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "metrics.jsonl", "curves.png"} <= files
    assert not any(f.startswith("checkpoint-") for f in files)  # checkpoints are removed at the end
    rep = json.load(open(os.path.join(trained, "report.json")))
    for k in REPORT_FIELDS:
        assert k in rep
    assert rep["method"] == "lora" and rep["metric_name"] == "exact_match"
    assert 0.0 <= rep["metric_before"] <= 1.0 and 0.0 <= rep["metric_after"] <= 1.0
    assert rep["steps"] == 3 and rep["train_tokens"] > 0 and rep["peak_rss_bytes"] > 10 * 2**20
    # LoRA r=4 on the 7 linear layers x 2 blocks of TL: r * (in + out) each
    per_block = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert rep["trainable_params"] == 2 * per_block
    cfg = json.load(open(os.path.join(trained, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["task_type"] == "CAUSAL_LM"
    rows = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 3]
    assert rows[-1]["metric"] == rep["metric_after"]


def test_existing_out_is_refused_without_overwrite(tiny, trained, capsys):
    before = os.path.getmtime(os.path.join(trained, "report.json"))
    code, out, err = run(capsys, *train_args(tiny, trained))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert os.path.getmtime(os.path.join(trained, "report.json")) == before


def test_overwrite_replaces_a_previous_run_but_never_foreign_files(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(tiny, out, "--max-steps", "1")) == 0
    (out / "checkpoint-9").mkdir()  # the user's folder, though named like a checkpoint: not in the marker
    assert main(train_args(tiny, out, "--max-steps", "1", "--overwrite")) == 0
    assert (out / "checkpoint-9").is_dir()
    (out / "checkpoint-9").rmdir()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, *train_args(tiny, foreign, "--overwrite"))
    assert code == 2 and (foreign / "notes.txt").read_text() == "keep me"
    # a user's folder holding files with the names deltatune writes (an HF model copy, a project)
    # is not deltatune's output: nothing in it is deleted, whatever the flags
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "config.json").write_text("{}")
    (proj / "model.safetensors").write_text("weights")
    (proj / "src" / "main.py").write_text("print(1)")
    code, _, err = run(capsys, *train_args(tiny, proj, "--overwrite"))
    assert code == 2 and "not written by deltatune" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(proj)) == ["config.json", "model.safetensors", "src"]
    assert (proj / "src" / "main.py").read_text() == "print(1)"
    # a file the user added to a run folder survives --overwrite; deltatune's own files are replaced
    (out / "notes.txt").write_text("my notes")
    old_report = (out / "report.json").read_text()
    assert main(train_args(tiny, out, "--max-steps", "2", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert json.loads((out / "report.json").read_text())["steps"] == 2 and (out / "report.json").read_text() != old_report
    marker = json.loads((out / "deltatune-output.json").read_text())
    assert marker["command"] == "train" and "adapter_model.safetensors" in marker["files"]
    assert "notes.txt" not in marker["files"] and marker["kept"] == ["notes.txt"]
    assert main(train_args(tiny, out, "--max-steps", "1", "--overwrite")) == 0  # and again: still kept
    assert (out / "notes.txt").read_text() == "my notes"


def test_overwrite_deletes_nothing_when_the_new_run_fails_its_checks(tiny, tmp_path, capsys):
    out = tmp_path / "keep"
    assert main(train_args(tiny, out, "--max-steps", "1")) == 0
    before = sorted(os.listdir(out))
    for bad in (["--model", str(tmp_path / "nonexistent")], ["--data", str(tmp_path / "missing.jsonl")],
                ["--method", "nope"], ["--target-modules", "no_such_module"],
                ["--method", "prompt-tuning", "--packing", "on"], ["--method", "prefix-tuning", "--shared-prefix", "on"]):
        code, _, err = run(capsys, *train_args(tiny, out, "--overwrite", *bad))
        assert code == 2, bad
        assert sorted(os.listdir(out)) == before, bad  # the previous run is still all there
    # --out under a file, and merge into the adapter's own folder, are refused up front
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, *train_args(tiny, tmp_path / "afile" / "sub"))
    assert code == 2 and "lies under the file" in err
    code, _, err = run(capsys, "merge", "--adapter", str(out), "--model", tiny[0], "--out", str(out), "--overwrite")
    assert code == 2 and "would replace the adapter folder" in err and sorted(os.listdir(out)) == before
    code, _, err = run(capsys, "merge", "--adapter", str(out), "--model", tiny[0], "--out", str(tmp_path / "m"),
                       "--dtype", "foo")
    assert code == 2 and "--dtype" in err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--max-stepz", "3"], "--max-stepz"),
    (["train", "--max-steps", "zero"], "max-steps"),
    (["train", "--max-steps", "-1", "--out", "OUT"], "max_steps"),
    (["train", "--data", "/nonexistent/d.jsonl", "--out", "OUT", "--model", "MODEL"], "not found"),
    (["train", "--model", "/nonexistent/model", "--out", "OUT"], "/nonexistent/model"),
    (["train", "--model", "someorg/no-such-model", "--out", "OUT"], "never downloads models"),  # a hub id: the hint
    (["train", "--method", "nope", "--out", "OUT"], "nope"),
    (["train", "--config", "/nonexistent.yaml"], "config file"),
    (["merge", "--adapter", "/nonexistent"], "--out"),
    (["merge", "--adapter", "/nonexistent", "--out", "OUT"], "adapter"),
    (["eval", "--adapter", "/nonexistent"], "adapter"),
    (["inspect", "/nonexistent"], "adapter"),
    (["generate", "--model", "MODEL"], "--prompt"),
    (["frobnicate"], "frobnicate"),
    ([], "command"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny, tmp_path, capsys, argv, needle):
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("MODEL", tiny[0]) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltatune"), err
    assert needle in lines[0]


def test_malformed_data_row_is_named(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w7", "completion": "w8"}\n{"prompt": "w9"}\n')
    code, _, err = run(capsys, "train", "--model", tiny[0], "--data", str(bad), "--out", str(tmp_path / "o"),
                       "--no-progress", "--ppl-size", "0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "bad.jsonl" in err and "row 2" in err and "completion" in err


def test_yaml_config_and_flags_win(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_steps: 7\nlr: 0.01\nbatch-size: 2\nmethod_options: {num_virtual_tokens: 4}\n")
    from deltatune.train.config import read_yaml

    cfg = build_config(read_yaml(str(y)), {"max_steps": 3, "lr": None, "method_options": {"x": 1}})
    assert cfg.max_steps == 3 and cfg.lr == 0.01 and cfg.batch_size == 2
    assert cfg.method_options == {"num_virtual_tokens": 4, "x": 1}
    assert cfg.method_options["num_virtual_tokens"] == 4 and cfg.r == 16
    assert build_config({}, {}).to_dict() == dataclasses.replace(TrainConfig(), lr=1e-3).to_dict()
    with pytest.raises(OptionError, match="did you mean max_steps"):
        build_config({"max_step": 3})
    with pytest.raises(OptionError, match="must be an integer"):
        build_config({"max_steps": 2.5})
    assert build_config({"target_modules": "q_proj, v_proj"}).target_modules == ["q_proj", "v_proj"]


def test_learning_rate_defaults_to_the_methods_and_an_explicit_one_wins(tmp_path, capsys):
    from deltatune.train.presets import PRESETS

    assert all(isinstance(p.lr, float) and p.lr > 0 for p in PRESETS.values())  # every method has its default
    expected = {"lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "bottleneck": 1e-3, "ia3": 1e-2, "p-tuning": 1e-2,
                "prefix-tuning": 1e-2, "llama-adapter": 1e-2, "prompt-tuning": 3e-2, "full": 3e-5}
    for method, lr in expected.items():
        assert build_config({}, {"method": method}).lr == lr, method
        assert build_config({}, {"method": method, "lr": 5e-4}).lr == 5e-4  # a flag wins
        assert build_config({"lr": 2e-4}, {"method": method}).lr == 2e-4  # so does the config file
    with pytest.raises(OptionError, match="'lr' must be a finite number > 0"):
        build_config({}, {"lr": 0})
    y = tmp_path / "c.yaml"
    y.write_text("lr: fast\n")
    with pytest.raises(OptionError, match="'lr' must be a number"):
        build_config(read_yaml(str(y)))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_rows = {tuple(line.split()) for line in capsys.readouterr().out.splitlines()}
    assert all((m, f"{lr:g}") in help_rows for m, lr in expected.items())  # --help lists each default


def test_train_from_yaml_config(tiny, tmp_path):
    y = tmp_path / "c.yaml"
    model_dir, data = tiny
    y.write_text(f"model: {model_dir}\ndata: {data}\nmax_steps: 5\nbatch_size: 4\nppl_size: 0\neval_size: 2\n"
                 f"eval_every: 0\nprogress: false\nrank: 2\n".replace("rank", "r"))
    out = tmp_path / "o"
    assert main(["train", "--config", str(y), "--out", str(out), "--max-steps", "2", "--threads", "1"]) == 0
    rep = json.load(open(out / "report.json"))
    assert rep["steps"] == 2 and rep["config"]["r"] == 2 and rep["config"]["batch_size"] == 4


def test_eval_generate_inspect_merge(tiny, trained, tmp_path, capsys):
    from deltatune import load_adapter
    from deltatune.formats.peft import read_adapter_tensors

    model_dir, data = tiny
    code, out, err = run(capsys, "eval", "--adapter", trained, "--model", model_dir, "--data", data, "--json",
                         "--eval-size", "6")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["metric_name"] == "exact_match" and res["n"] == 6 and res["eval_loss"] > 0

    code, out, err = run(capsys, "generate", "--adapter", trained, "--model", model_dir, "--prompt", "w7 w8",
                         "--prompt", "w9", "--max-new-tokens", "4", "--json")
    assert code == 0
    answers = [json.loads(line) for line in out.strip().splitlines()]
    assert [a["prompt"] for a in answers] == ["w7 w8", "w9"]
    assert all(set(a["answer"].split()) <= {f"w{i}" for i in range(6, 128)} for a in answers)

    code, out, err = run(capsys, "inspect", trained, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["method"] == "LORA" and info["rank"] == 4 and info["targets"] == "all-linear"
    tensors = read_adapter_tensors(trained)
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert len(info["modules"]) == 14
    row = next(r for r in info["modules"] if r["module"] == "model.layers.1.mlp.down_proj")
    A = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    B = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert abs(row["norm"] - float(torch.linalg.matrix_norm(2.0 * B @ A))) < 1e-5 and row["norm"] > 0
    code, out, _ = run(capsys, "inspect", trained)
    assert code == 0 and "model.layers.1.mlp.down_proj" in out and "rank:" in out

    merged = tmp_path / "merged"
    code, out, err = run(capsys, "merge", "--adapter", trained, "--model", model_dir, "--out", str(merged))
    assert code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template
    adapted = load_adapter(make_tl(), trained)
    x = torch.tensor([[1, 3, 7, 8, 9, 5, 4]])
    with torch.no_grad():
        d = (plain(x).logits - adapted(x).logits).abs().max()
        moved = (make_tl()(x).logits - adapted(x).logits).abs().max()
    assert float(d) < 1e-5 and float(moved) > 1e-4
    code, _, err = run(capsys, "merge", "--adapter", trained, "--model", model_dir, "--out", str(merged))
    assert code == 2 and "--overwrite" in err


def test_help_for_every_command(capsys):
    for cmd in ("train", "eval", "generate", "merge", "inspect"):
        with pytest.raises(SystemExit) as ei:
            main([cmd, "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert "usage: deltatune " + cmd in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-steps", "--method", "--out", "--config", "--overwrite", "--data", "--model"):
        assert flag in out
    assert "lora" in out


def _methods():
    from deltatune.train.presets import PRESETS

    return sorted(PRESETS)


@pytest.mark.parametrize("method", _methods())
def test_every_registered_method_trains_through_the_one_loop(tiny, tmp_path, capsys, method):
    model_dir, data = tiny
    out = tmp_path / method
    extra = ["--method-opt", "adapter_layers=2"] if method == "llama-adapter" else []
    code, _, err = run(capsys, *train_args(tiny, out, "--method", method, "--max-steps", "2", "--no-plot", *extra))
    assert code == 0, err
    rep = json.load(open(out / "report.json"))
    assert rep["method"] == method and rep["trainable_params"] > 0 and rep["train_tokens"] > 0
    assert (out / ("model.safetensors" if method == "full" else "adapter_config.json")).exists()
    if method != "full":
        # deltatune inspect lists it: its method and every adapted module with its tensors
        code, shown, _ = run(capsys, "inspect", str(out), "--json")
        info = json.loads(shown)
        assert code == 0 and info["method"] == json.load(open(out / "adapter_config.json"))["peft_type"]
        from deltatune.formats.peft import read_adapter_tensors

        assert info["modules"] and info["parameters"] == sum(t.numel() for t in read_adapter_tensors(str(out)).values())
    if method == "qlora":
        return  # its base is quantized during training; the check below loads a dense base
    # the saved adapter, loaded onto a fresh base, reproduces the final eval loss of training
    from deltatune import load_adapter
    from deltatune.train.data import ChatEncoder, load_examples, split_examples
    from deltatune.train.evaluate import Evaluator

    from deltatune.train.precision import resolve_precision

    tok = make_tt()
    _, held = split_examples(load_examples(data), 0.2, 0, max_eval=4)
    prec = resolve_precision(rep["precision"], torch.device("cpu"))  # as the run computed
    ev = Evaluator(tok, held, ChatEncoder(tok), size=4, loss_size=64, precision=prec)
    from transformers import AutoModelForCausalLM

    if method == "full":  # the run's weights are the float32 model folder it wrote
        trained_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=prec.base_dtype)  # loaded as the run loads it
        trained_model = load_adapter(base, str(out))
    res = ev(trained_model)
    assert abs(res["eval_loss"] - rep["eval_loss_after"]) < 1e-5
    assert res["metric"] == rep["metric_after"]


@pytest.mark.parametrize("extra, needle", [
    (["--max-grad-norm", "-1"], "max_grad_norm"),
    (["--lora-alpha", "0"], "lora_alpha"),
    (["--lora-alpha", "-5"], "lora_alpha"),
    (["--threads", "0"], "threads"),
    (["--threads", "-1"], "threads"),
    (["--save-every", "-1"], "save_every"),
    (["--lr", "nan"], "'lr'"),
    (["--weight-decay", "-1"], "weight_decay"),
    (["--lora-dropout", "1.5"], "lora_dropout"),
    (["--method-opt", "r=[1"], "--method-opt"),
    (["--method-opt", "=3"], "KEY=VALUE"),
    (["--method-opt", "use_rslora=maybe"], "use_rslora"),
])
def test_bad_numbers_and_options_are_refused_before_training(tiny, tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    code, _, err = run(capsys, *train_args(tiny, out, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deltatune: error:"), err
    assert needle in lines[0]
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("yaml_text, needle", [
    ("method: [lora]\n", "'method'"), ("model: {a: 1}\n", "'model'"), ("data: [a]\n", "'data'"),
    ("out: [5]\n", "'out'"), ("target_modules: 5\n", "target_modules"), ("rank: x\n", "'r'"),
])
def test_yaml_values_of_the_wrong_type_are_one_line_errors(tiny, tmp_path, capsys, yaml_text, needle):
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    code, _, err = run(capsys, "train", "--config", str(y))
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_yaml_keys_may_be_spelled_as_the_flags():
    assert build_config({"rank": 4, "max-steps": 2}).r == 4


def test_single_target_module_name_and_no_held_out_set(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(tiny, out, "--target-modules", "q_proj", "--val-fraction", "0", "--max-steps", "1")) == 0
    rep = json.load(open(out / "report.json"))
    assert rep["metric_after"] is None and rep["eval_examples"] is None  # no held-out set: no metric
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["target_modules"] == ["q_proj"] and rep["trainable_params"] == 2 * 16 * (32 + 32)  # r=16 on q_proj (32->32) of 2 blocks


def test_diverging_run_stops_with_one_line_and_saves_no_adapter(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(capsys, *train_args(tiny, out, "--lr", "1e30", "--max-grad-norm", "0"))
    assert code == 2 and "diverged" in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "adapter_model.safetensors").exists()


def test_damaged_adapter_files_are_one_line_errors(trained, tiny, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    for argv in (["inspect", str(bad)], ["eval", "--adapter", str(bad), "--model", tiny[0], "--eval-size", "2"]):
        code, _, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("deltatune: error:"), err
    (bad / "adapter_config.json").write_text("[1]")
    code, _, err = run(capsys, "inspect", str(bad))
    assert code in (1, 2) and len(err.strip().splitlines()) == 1


def test_merge_refuses_prompt_methods(tiny, tmp_path, capsys):
    out = tmp_path / "pt"
    assert main(train_args(tiny, out, "--method", "prompt-tuning", "--method-opt", "num_virtual_tokens=2",
                           "--method-opt", "prompt_tuning_init=RANDOM", "--max-steps", "1")) == 0
    code, _, err = run(capsys, "merge", "--adapter", str(out), "--model", tiny[0], "--out", str(tmp_path / "m"))
    assert code == 2 and "cannot be merged" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_error_after_model_load_is_one_line_in_a_fresh_process(tiny, tmp_path):
    """Library import-time chatter (torchao, torch pytree notes) must not break the one-line rule."""
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "deltatune")
    argv = [exe] if os.path.exists(exe) else [sys.executable, "-m", "deltatune.cli"]
    p = subprocess.run(argv + train_args(tiny, tmp_path / "o", "--target-modules", "no_such_proj")[0:],
                       capture_output=True, text=True, timeout=240)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "no_such_proj" in lines[0], p.stderr


def test_eval_without_data_scores_the_runs_own_held_out_split(trained, tiny, capsys):
    rep = json.load(open(os.path.join(trained, "report.json")))
    code, out, _ = run(capsys, "eval", "--adapter", trained, "--model", tiny[0], "--json", "--threads", "1")
    assert code == 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n"] == rep["eval_examples"] and res["metric"] == rep["metric_after"]
    assert abs(res["eval_loss"] - rep["eval_loss_after"]) < 1e-5
    assert "held-out split" in res["data"]


def test_unknown_method_options_are_refused_and_each_known_one_is_read(tiny, tmp_path, capsys):
    from deltatune.train.presets import PRESETS

    assert all(isinstance(p.options, tuple) for p in PRESETS.values())
    code, _, err = run(capsys, *train_args(tiny, tmp_path / "o", "--method-opt", "bogus=1"))
    assert code == 2 and "no option 'bogus'" in err and "use_rslora" in err and not (tmp_path / "o").exists()
    code, _, err = run(capsys, *train_args(tiny, tmp_path / "o", "--method", "ia3", "--method-opt", "num_virtual_tokens=3"))
    assert code == 2 and "no option 'num_virtual_tokens'" in err
    # every listed option is really read by its builder: an invalid value for it is an error
    from deltatune.train.pipeline import build_method_config

    assert build_config({}, {"method": "lora", "method_options": {"use_rslora": True}}).method_options
    cfg = build_method_config(build_config({}, {"method": "prompt-tuning",
                                                "method_options": {"num_virtual_tokens": 7,
                                                                   "prompt_tuning_init": "RANDOM"}}))
    assert cfg.num_virtual_tokens == 7
    assert build_method_config(build_config({}, {"method": "lora", "method_options": {"use_rslora": True}})).use_rslora


# ----------------------------------------------------------------------------- method fields a method does not read

FOREIGN_FLAGS = [
    ("ia3", ["--rank", "4"], "--rank"),
    ("ia3", ["--lora-alpha", "8"], "--lora-alpha"),
    ("ia3", ["-r", "16"], "--rank"),  # the default value, set explicitly: still refused
    ("bottleneck", ["--lora-dropout", "0.1"], "--lora-dropout"),
    ("bottleneck", ["--rank", "4"], "--rank"),
    ("prompt-tuning", ["--target-modules", "q_proj"], "--target-modules"),
    ("prompt-tuning", ["--rank", "4"], "--rank"),
    ("p-tuning", ["--lora-alpha", "8"], "--lora-alpha"),
    ("prefix-tuning", ["--target-modules", "all-linear"], "--target-modules"),
    ("llama-adapter", ["--rank", "4"], "--rank"),
    ("llama-adapter", ["--lora-dropout", "0.05"], "--lora-dropout"),
    ("ia3", ["--method-opt", "r=4"], "--method-opt r"),
    ("loha", ["--lora-dropout", "0.1"], "--lora-dropout"),
    ("vera", ["--lora-alpha", "8"], "--lora-alpha"),
    ("oft", ["--rank", "4"], "--rank"),
    ("boft", ["--lora-alpha", "8"], "--lora-alpha"),
    ("full", ["--rank", "4"], "--rank"),
    ("full", ["--target-modules", "q_proj"], "--target-modules"),
]


@pytest.mark.parametrize("method, extra, named", FOREIGN_FLAGS)
def test_a_method_field_the_method_does_not_read_is_refused(tiny, tmp_path, capsys, method, extra, named):
    out = tmp_path / "o"
    code, _, err = run(capsys, *train_args(tiny, out, "--method", method, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deltatune: error:"), err
    assert f"{named} is not an option of --method {method} (its options: " in lines[0]
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("method, key, value", [
    ("ia3", "rank", 4), ("ia3", "lora_alpha", 8), ("bottleneck", "lora-dropout", 0.1),
    ("prompt-tuning", "target_modules", "q_proj"), ("p-tuning", "r", 2), ("llama-adapter", "lora_alpha", 8),
])
def test_a_config_file_key_the_method_does_not_read_is_refused(tiny, tmp_path, capsys, method, key, value):
    y = tmp_path / "c.yaml"
    y.write_text(f"method: {method}\n{key}: {value}\n")
    code, _, err = run(capsys, *train_args(tiny, tmp_path / "o", "--config", str(y)))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert f"config file key '{key}' is not an option of --method {method}" in lines[0]
    with pytest.raises(OptionError, match=f"is not an option of --method {method}"):
        build_config(read_yaml(str(y)), {})
    # a method given as a flag over the file's: the file's key is still the user's
    y.write_text(f"{key}: {value}\n")
    with pytest.raises(OptionError, match=f"config file key '{key}' is not an option of --method {method}"):
        build_config(read_yaml(str(y)), {"method": method})


def test_the_reparameterisations_read_their_options_and_defaults():
    from deltatune.train.pipeline import build_method_config

    def built(method, **flags):
        opts = flags.pop("method_options", {})
        return build_method_config(build_config({}, {"method": method, "method_options": opts, **flags}))

    loha = built("loha", method_options={"rank_dropout": "0.1", "use_effective_conv2d": "true"})
    assert (loha.r, loha.alpha, loha.rank_dropout, loha.use_effective_conv2d) == (8, 16.0, 0.1, True)
    assert loha.target_modules == "all-linear" and built("loha", r=4).r == 4
    lokr = built("lokr", method_options={"decompose_both": "yes", "decompose_factor": "4", "init_weights": "lycoris"})
    assert (lokr.r, lokr.decompose_both, lokr.decompose_factor, lokr.init_weights) == (16, True, 4, "lycoris")
    assert built("lokr", method_options={"init_weights": "false"}).init_weights is False
    vera = built("vera", method_options={"projection_prng_key": "5", "save_projection": "false"})
    assert (vera.r, vera.projection_prng_key, vera.save_projection) == (256, 5, False) and built("vera", r=64).r == 64
    ada = built("adalora", max_steps=40, method_options={"target_r": "4", "deltaT": "2"})
    assert (ada.init_r, ada.target_r, ada.lora_alpha, ada.total_step, ada.tinit, ada.tfinal, ada.deltaT) == \
        (12, 4, 24.0, 40, 4, 8, 2)
    assert built("adalora").total_step == 550  # the default task: 8800 questions in batches of 16
    oft = built("oft", method_options={"oft_block_size": "16", "coft": "true", "eps": "1e-3"})
    assert (oft.oft_block_size, oft.coft, oft.eps, oft.r) == (16, True, 1e-3, 0)
    boft = built("boft")
    assert (boft.boft_block_size, boft.boft_n_butterfly_factor) == (8, 2)
    boft = built("boft", method_options={"boft_block_num": "4"})
    assert (boft.boft_block_size, boft.boft_block_num) == (0, 4)
    with pytest.raises(UsageError, match="--method oft"):
        built("oft", method_options={"oft_block_size": "0"})  # r and oft_block_size both 0


def test_defaults_and_the_fields_a_method_reads_are_accepted():
    from deltatune.train.presets import METHOD_FIELDS, PRESETS
    from deltatune.train.pipeline import build_method_config

    for name, preset in PRESETS.items():
        cfg = build_config({}, {"method": name})  # every field at its default: nothing is refused
        assert cfg.r == preset.field_defaults.get("r", 16) and cfg.target_modules is None
        assert cfg.lora_alpha == preset.field_defaults.get("lora_alpha", 32.0)
        for field in preset.uses:  # a field the method reads may be set, as flag or key
            value = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "target_modules": "q_proj"}[field]
            assert getattr(build_config({}, {"method": name, field: value}), field) == value
            assert getattr(build_config({field: value}, {"method": name}), field) == value
        assert preset.uses <= set(METHOD_FIELDS)
    assert PRESETS["lora"].uses == PRESETS["qlora"].uses == PRESETS["dora"].uses == set(METHOD_FIELDS)
    assert PRESETS["ia3"].uses == PRESETS["bottleneck"].uses == PRESETS["llama-adapter"].uses == {"target_modules"}
    for name in ("prompt-tuning", "p-tuning", "prefix-tuning", "full"):
        assert PRESETS[name].uses == frozenset()
    # the typed route: the flag's int reaches the LoRA config; a --method-opt of a field sets the field
    assert build_method_config(build_config({}, {"method": "lora", "r": 4})).r == 4
    assert build_config({}, {"method": "lora", "method_options": {"r": 8}}).r == 8
    assert build_method_config(build_config({}, {"method": "ia3", "target_modules": "q_proj,v_proj"})).target_modules \
        == ["q_proj", "v_proj"]


def test_train_help_lists_every_method_with_its_lr(capsys):
    from deltatune.train.presets import PRESETS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"  {name:<16}{preset.lr:g}" in out


# ----------------------------------------------------------------------------- QLoRA adapters remember their base


@pytest.fixture(scope="module")
def qlora_trained(tiny, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("qrun") / "adapter"
    assert main(train_args(tiny, out, "--method", "qlora", "--rank", "4", "--lr", "1e-2", "--no-plot",
                           "--target-modules", "q_proj,v_proj", "--precision", "fp32")) == 0  # exact comparisons
    return str(out)


BASE_LINE = "base: 4-bit nf4 (bitsandbytes, double quant) as the adapter was trained"


def test_qlora_adapter_records_its_base_in_the_weights_file(qlora_trained, trained):
    from safetensors.torch import load_file

    from deltatune.formats.peft import BASE_QUANTIZATION_KEY, read_adapter_metadata

    meta = read_adapter_metadata(qlora_trained)
    kw = json.loads(meta[BASE_QUANTIZATION_KEY])
    assert kw["quant_type"] == "nf4" and kw["backend"] == "bitsandbytes" and kw["double_quant"] is True
    assert kw["compute_dtype"] == "float32"  # the run's precision (fp32 here; bf16 runs record bfloat16)
    assert kw["blocksize"] == 64 and kw["skip_modules"] == []
    assert len(kw["target_modules"]) == 14 and "model.layers.1.mlp.down_proj" in kw["target_modules"]
    assert meta["format"] == "pt"
    assert load_file(os.path.join(qlora_trained, "adapter_model.safetensors"))  # still a plain PEFT file
    assert BASE_QUANTIZATION_KEY not in read_adapter_metadata(trained)  # a dense base records nothing


def test_qlora_adapter_is_evaluated_and_generated_on_its_4bit_base(qlora_trained, tiny, capsys):
    from deltatune.formats.peft import BASE_QUANTIZATION_KEY, read_adapter_metadata
    from deltatune.quant import is_quantized
    from deltatune.train.commands import load_with_adapter
    from deltatune.train.data import ChatEncoder, load_examples, split_examples
    from deltatune.train.evaluate import Evaluator

    rep = json.load(open(os.path.join(qlora_trained, "report.json")))
    code, out, err = run(capsys, "eval", "--adapter", qlora_trained, "--model", tiny[0], "--json", "--threads", "1")
    assert code == 0 and BASE_LINE in err.splitlines()
    res = json.loads(out.strip().splitlines()[-1])
    assert abs(res["eval_loss"] - rep["eval_loss_after"]) < 1e-5 and res["metric"] == rep["metric_after"]
    # on the dense base the same adapter scores otherwise: the base matters
    from deltatune import load_adapter

    tok = make_tt()
    _, held = split_examples(load_examples(tiny[1]), 0.2, 0, max_eval=4)
    dense = Evaluator(tok, held, ChatEncoder(tok), size=4, loss_size=64)(load_adapter(make_tl(), qlora_trained))
    assert abs(dense["eval_loss"] - rep["eval_loss_after"]) > 1e-4

    lines: list = []
    model, _, _ = load_with_adapter(qlora_trained, tiny[0], log=lines.append)
    assert lines == [BASE_LINE]
    layers = dict(model.named_modules())
    kw = json.loads(read_adapter_metadata(qlora_trained)[BASE_QUANTIZATION_KEY])
    assert len(kw["target_modules"]) == 14 and all(is_quantized(layers[n]) for n in kw["target_modules"])

    code, out, err = run(capsys, "generate", "--adapter", qlora_trained, "--model", tiny[0], "--prompt", "w7 w8",
                         "--max-new-tokens", "3", "--json")
    assert code == 0 and BASE_LINE in err.splitlines()
    assert json.loads(out.strip().splitlines()[-1])["prompt"] == "w7 w8"


def test_qlora_merge_is_dequantized_base_plus_delta(qlora_trained, tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from deltatune.formats.peft import BASE_QUANTIZATION_KEY, read_adapter_metadata, read_adapter_tensors
    from deltatune.layers import dense_weight
    from deltatune.methods.lora import lora_scaling
    from deltatune.quant import is_quantized, quantize_base
    from deltatune.train.commands import load_with_adapter

    merged = tmp_path / "merged"
    code, _, err = run(capsys, "merge", "--adapter", qlora_trained, "--model", tiny[0], "--out", str(merged))
    assert code == 0 and BASE_LINE in err.splitlines()
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    got = dict(plain.named_parameters())
    assert all(p.dtype == torch.float32 for p in got.values())
    kw = json.loads(read_adapter_metadata(qlora_trained)[BASE_QUANTIZATION_KEY])
    base = quantize_base(AutoModelForCausalLM.from_pretrained(tiny[0]).eval(), **kw)
    tensors = read_adapter_tensors(qlora_trained)
    scale = lora_scaling(4, 32.0)
    seen = {"adapted": 0, "plain": 0}
    for name, mod in base.named_modules():
        if not is_quantized(mod):
            continue
        w4 = dense_weight(mod)  # dequant(W4)
        key = f"base_model.model.{name}.lora_A.weight"
        if key in tensors:  # q_proj, v_proj: dequant(W4) + scale * B @ A
            want = w4 + scale * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
            assert float((want - w4).abs().max()) > 1e-4  # the adapter moved it
            seen["adapted"] += 1
        else:  # no adapter there: written dequantized
            want = w4
            seen["plain"] += 1
        assert torch.allclose(got[f"{name}.weight"], want, atol=1e-6), name
        assert not torch.allclose(got[f"{name}.weight"], dict(make_tl().named_parameters())[f"{name}.weight"])
    assert seen == {"adapted": 4, "plain": 10}
    # and it computes what the adapter on the 4-bit base computes
    adapted, _, _ = load_with_adapter(qlora_trained, tiny[0], log=None)
    x = torch.tensor([[1, 3, 7, 8, 9, 5, 4]])
    with torch.no_grad():
        assert float((plain(x).logits - adapted(x).logits).abs().max()) < 1e-5
