"""``deltatune train --method full`` on the tiny model folder (TL + TT): every weight trains through the
one loop, the base is scored before training, the output is a model folder (``eval``/``generate
--model OUT`` read it), weights stay float32 under bf16 compute, and the folder follows the ownership
rules of merge's output."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_dv, make_tl, make_tt, model_folder, with_flags
from deltatune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_full")
    model_dir = model_folder(root / "tl", make_tl(), make_tt())
    data = root / "dv.jsonl"
    with open(data, "w") as fh:
        for m in make_dv(24):
            fh.write(json.dumps({"messages": m}) + "\n")
    return model_dir, str(data)


def full_args(tiny, out, *extra):
    model_dir, data = tiny
    return with_flags(["train", "--method", "full", "--model", model_dir, "--data", data, "--out", str(out),
                       "--max-steps", "3", "--batch-size", "4", "--eval-size", "4", "--eval-every", "0", "--ppl-size",
                       "2", "--threads", "1", "--no-progress", "--no-plot", "--val-fraction", "0.2"], *extra)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(full_args(tiny, out, "--lr", "1e-2", "--precision", "fp32")) == 0
    return str(out)


def held_out_evaluator(tiny, precision=None):
    from deltatune.train.data import ChatEncoder, load_examples, split_examples
    from deltatune.train.evaluate import Evaluator

    tok = make_tt()
    _, held = split_examples(load_examples(tiny[1]), 0.2, 0, max_eval=4)
    return Evaluator(tok, held, ChatEncoder(tok), size=4, loss_size=64, precision=precision)


def test_full_trains_every_weight_into_a_model_folder(full_run, tiny):
    from transformers import AutoModelForCausalLM

    files = set(os.listdir(full_run))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "report.json", "metrics.jsonl", "deltatune-output.json"} <= files
    assert "adapter_config.json" not in files and not any(f.startswith("checkpoint-") for f in files)
    marker = json.load(open(os.path.join(full_run, "deltatune-output.json")))
    assert marker["command"] == "train" and "model.safetensors" in marker["files"]
    rep = json.load(open(os.path.join(full_run, "report.json")))
    base = make_tl()
    n = sum(p.numel() for p in base.parameters())
    assert rep["method"] == "full" and rep["saved"] == "model" and rep["weights_dtype"] == "float32"
    assert rep["trainable_params"] == rep["total_params"] == n == 26_784
    trained = AutoModelForCausalLM.from_pretrained(full_run).eval()
    before = dict(base.named_parameters())
    after = dict(trained.named_parameters())
    assert set(after) == set(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []  # every tensor trained: attention, MLP, norms, embeddings, head
    assert all(p.dtype == torch.float32 for p in after.values())
    # the "before" column is the base model's own score; the "after" column is the saved model's
    ev = held_out_evaluator(tiny)
    res_base, res_after = ev(base), ev(trained)
    assert abs(rep["eval_loss_before"] - res_base["eval_loss"]) < 1e-5 and rep["metric_before"] == res_base["metric"]
    assert abs(rep["eval_loss_after"] - res_after["eval_loss"]) < 1e-5 and rep["metric_after"] == res_after["metric"]
    assert rep["eval_loss_after"] < rep["eval_loss_before"]
    assert rep["perplexity_before"] != rep["perplexity_after"]


def test_eval_and_generate_take_the_model_folder(full_run, tiny, capsys):
    rep = json.load(open(os.path.join(full_run, "report.json")))
    code, out, err = run(capsys, "eval", "--model", full_run, "--json", "--threads", "1")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert "held-out split" in res["data"] and res["n"] == rep["eval_examples"]  # the run's own split
    assert abs(res["eval_loss"] - rep["eval_loss_after"]) < 1e-5 and res["metric"] == rep["metric_after"]
    code, out, err = run(capsys, "generate", "--model", full_run, "--prompt", "w7 w8", "--max-new-tokens", "3",
                         "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["prompt"] == "w7 w8"
    for cmd in (["eval", "--adapter", full_run, "--model", tiny[0]], ["merge", "--adapter", full_run, "--out",
                                                                        os.path.join(os.path.dirname(full_run), "m")]):
        code, _, err = run(capsys, *cmd)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"pass it as --model {full_run}" in lines[0], err


def test_bf16_compute_keeps_float32_master_weights(tiny, tmp_path, capsys):
    """Under --precision bf16 the weights stay float32: updates far below a bf16 step of their weight
    (which a bf16 weight would round away) are kept. --dtype bfloat16 is refused."""
    from safetensors import safe_open

    out = tmp_path / "bf"
    code, stdout, err = run(capsys, *full_args(tiny, out, "--lr", "1e-4", "--precision", "bf16", "--max-steps", "2",
                                               "--ppl-size", "0"))
    assert code == 0, err
    rep = json.load(open(out / "report.json"))
    assert rep["precision"] == "bf16" and rep["weights_dtype"] == "float32" and rep["config"]["dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    base = dict(make_tl().named_parameters())
    tiny_steps = kept = 0
    for k, w in base.items():
        w = w.detach()
        assert got[k].dtype == torch.float32
        delta = (got[k] - w).abs()
        spacing = (w.abs().to(torch.bfloat16).float() * 2 ** -7).clamp_min(1e-30)  # a bf16 step near |w| (upper bound)
        small = (delta > 0) & (delta < spacing / 4)
        tiny_steps += int(small.sum())
        kept += int((delta > 0).sum())
    assert kept > 20_000 and tiny_steps > 5_000, (kept, tiny_steps)
    code, _, err = run(capsys, *full_args(tiny, tmp_path / "no", "--dtype", "bfloat16"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--dtype bfloat16 with --method full" in lines[0]
    assert "leave --dtype out" in lines[0] and not (tmp_path / "no").exists()


def test_full_output_folder_follows_the_ownership_rules(tiny, tmp_path, capsys):
    import shutil

    out = tmp_path / "o"
    assert main(full_args(tiny, out, "--max-steps", "1", "--ppl-size", "0")) == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *full_args(tiny, out, "--max-steps", "1", "--ppl-size", "0"))
    assert code == 2 and "--overwrite" in err
    assert main(full_args(tiny, out, "--max-steps", "2", "--ppl-size", "0", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine" and json.load(open(out / "report.json"))["steps"] == 2
    # a run never replaces its own base: the folder itself, or a checkpoint inside it
    ckpt = out / "checkpoint-7"
    ckpt.mkdir()
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / f, ckpt / f)
    before = sorted(os.listdir(out))
    for model in (out, ckpt):
        argv = full_args(tiny, out, "--overwrite")
        argv[argv.index("--model") + 1] = str(model)
        code, _, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "would replace the model folder" in lines[0], err
        assert sorted(os.listdir(out)) == before
    # a model folder deltatune did not write is never emptied
    foreign = tmp_path / "hf"
    model_folder(foreign, make_tl())
    code, _, err = run(capsys, *full_args(tiny, foreign, "--overwrite"))
    assert code == 2 and "not written by deltatune" in err and (foreign / "model.safetensors").exists()


def test_weight_decay_groups_of_a_fully_trained_model():
    """Full fine-tuning decays matrices (linear, embedding), never vectors (norm scales, neutral 1; biases)."""
    from deltatune import parameter_groups

    model = make_tl()
    decay, keep = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in keep) == ["model.layers.0.input_layernorm.weight",
                                                  "model.layers.0.post_attention_layernorm.weight",
                                                  "model.layers.1.input_layernorm.weight",
                                                  "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"]
    assert all(p.dim() == 2 for p in decay) and len(decay) == 2 * 7 + 2
