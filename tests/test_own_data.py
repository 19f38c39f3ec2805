"""What a new user meets with their own data and models: config files that take every flag's name and
name deltatune's key for other tools' names, the message for a hub model id, sampling in
``deltatune generate``, ``deltatune chat``, and a quiet model load from Python."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import make_tl, make_tt, model_folder
from deltatune.cli import build_parser, main
from deltatune.train.config import OTHER_TOOL_NAMES, OptionError, TrainConfig, build_config, read_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- config files


def _train_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["train"]._actions if a.option_strings and a.dest != "help"]


SAMPLE = {"method": "lora", "schedule": "cosine", "train_on": "all_assistant", "precision": "auto", "packing": "auto",
          "device": "cpu", "dtype": "float32", "target_modules": "q_proj", "report_to": "none", "model": "m",
          "data": "d.jsonl", "eval_data": "e.jsonl", "out": "o", "method_opt": ["use_rslora=true"], "truncation": "prompt"}


def test_every_train_flag_name_is_a_config_key():
    for action in _train_actions():
        key = action.option_strings[0][2:].replace("-", "_") if action.option_strings[0].startswith("--") else None
        if key is None or key in ("config", "resume"):  # --resume DIR names a run, not an option
            continue
        if key in SAMPLE:
            value = SAMPLE[key]
        elif isinstance(getattr(TrainConfig(), key, None), str):
            value = getattr(TrainConfig(), key)  # a string option's own default is a valid value
        elif action.choices:
            value = list(action.choices)[0]  # every choice-valued flag, present or future
        elif action.type is int:
            value = 2
        elif action.type is float:
            value = 0.5
        else:
            value = True  # --overwrite, --no-plot, --no-progress
        cfg = build_config({key: value}, {})  # raises OptionError for a key it does not take
        assert isinstance(cfg, TrainConfig), key


def test_flag_spelled_keys_set_what_the_flags_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method_opt": ["use_rslora=true", "rank_pattern={q_proj: 4}"], "no_plot": True,
                                    "no_progress": "yes", "rank": 8, "max-steps": 5, "report-to": "none"}))
    cfg = build_config(read_yaml(str(path)), {})
    assert cfg.method_options == {"use_rslora": True, "rank_pattern": {"q_proj": 4}}
    assert (cfg.plot, cfg.progress, cfg.r, cfg.max_steps) == (False, False, 8, 5)
    both = build_config({"method_options": {"a": 1}, "method_opt": "b=2"}, {"method_options": {"c": 3}})
    assert both.method_options == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(OptionError, match="cannot name another config file"):
        build_config({"config": "other.yaml"}, {})
    with pytest.raises(OptionError, match="--method-opt 'oops' must be KEY=VALUE"):
        build_config({"method_opt": ["oops"]}, {})


@pytest.mark.parametrize("theirs,ours", [("learning_rate", "lr"), ("num_train_epochs", "epochs"),
                                         ("per_device_train_batch_size", "batch_size"),
                                         ("gradient_accumulation_steps", "grad_accum"), ("lora_r", "r"),
                                         ("max_seq_length", "max_seq_len"), ("output_dir", "out"),
                                         ("model_name_or_path", "model")])
def test_other_tools_names_get_deltatunes_key(theirs, ours, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"{theirs}: 1\n")
    code, _, err = run(capsys, "train", "--config", str(path))
    assert code == 2 and err.strip() == (f"deltatune: error: unknown option {theirs!r} in config file: deltatune calls "
                                         f"it {ours!r}")


def test_the_other_tools_table_names_real_options():
    assert set(OTHER_TOOL_NAMES.values()) <= set(TrainConfig.field_names())
    assert not set(OTHER_TOOL_NAMES) & set(TrainConfig.field_names())


# ----------------------------------------------------------------------------- models


def test_a_hub_id_is_never_downloaded_and_the_message_says_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "generate", "--model", "HuggingFaceTB/SmolLM2-360M-Instruct", "--prompt", "hi")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "never downloads models" in lines[0]
    assert "--local-dir models/SmolLM2-360M-Instruct" in lines[0] and "--model models/SmolLM2-360M-Instruct" in lines[0]
    assert ".gguf" in lines[0]
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nothing-here"), "--prompt", "hi")
    assert code == 2 and "model not found at" in err  # a path, not an id


# ----------------------------------------------------------------------------- generate: sampling


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("own") / "tl", make_tl(), make_tt())


PROMPTS = ["w7 w8 w9", "w20", "w33 w34", "w90 w91 w92 w93"]


def test_generate_sampling(folder):
    from deltatune.train.commands import run_generate

    kw = dict(max_new_tokens=6, log=None, precision="fp32")
    greedy = run_generate(None, folder, PROMPTS, **kw)
    assert run_generate(None, folder, PROMPTS, temperature=0.0, **kw) == greedy
    a = run_generate(None, folder, PROMPTS, temperature=1.0, seed=0, **kw)
    assert run_generate(None, folder, PROMPTS, temperature=1.0, seed=0, **kw) == a  # repeatable with a seed
    assert run_generate(None, folder, PROMPTS, temperature=1.0, seed=1, **kw) != a
    assert a != greedy  # the random tiny model spreads its probability: samples leave the greedy path
    # a nucleus this small keeps only the most likely token: sampling gives the greedy answers
    assert run_generate(None, folder, PROMPTS, temperature=1.0, top_p=1e-6, seed=3, **kw) == greedy


@pytest.mark.parametrize("flag,value,msg", [("--temperature", "-1", "--temperature must be >= 0"),
                                            ("--top-p", "0", "--top-p must be in (0, 1]"),
                                            ("--top-p", "1.5", "--top-p must be in (0, 1]")])
def test_generate_sampling_refusals(folder, capsys, flag, value, msg):
    code, _, err = run(capsys, "generate", "--model", folder, "--prompt", "w7", flag, value)
    assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err


def test_generate_command_with_sampling_flags(folder, capsys):
    code, out, _ = run(capsys, "generate", "--model", folder, "--prompt", "w7 w8 w9", "--temperature", "0.8",
                       "--top-p", "0.9", "--seed", "4", "--max-new-tokens", "5", "--json", "--precision", "fp32")
    again = run(capsys, "generate", "--model", folder, "--prompt", "w7 w8 w9", "--temperature", "0.8",
                "--top-p", "0.9", "--seed", "4", "--max-new-tokens", "5", "--json", "--precision", "fp32")[1]
    assert code == 0 and json.loads(out)["prompt"] == "w7 w8 w9" and out == again


# ----------------------------------------------------------------------------- chat


def test_chat_session_keeps_the_conversation(folder):
    from deltatune.train.chat import ChatSession
    from deltatune.train.data import ChatEncoder, end_of_turn_ids, pad_id_of
    from deltatune.train.evaluate import greedy_generate

    model, tok = make_tl(), make_tt()
    s = ChatSession(model, tok, max_new_tokens=5)
    enc = ChatEncoder(tok)

    def greedy(msgs):
        out = greedy_generate(model, [enc.prompt_ids(msgs)], max_new_tokens=5, stop_ids=end_of_turn_ids(tok),
                              pad_id=pad_id_of(tok))[0]
        return tok.decode(out, skip_special_tokens=True)

    a1 = s.reply("w7 w8")
    assert a1 == greedy([{"role": "user", "content": "w7 w8"}])
    a2 = s.reply("w9")
    assert a2 == greedy([{"role": "user", "content": "w7 w8"}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": "w9"}])
    assert len(s.history) == 4
    s.reset()
    assert s.reply("w9") == greedy([{"role": "user", "content": "w9"}])
    # a context too small for the history drops the oldest exchanges first
    small = ChatSession(model, tok, max_new_tokens=5, max_context=5 + 20)
    small.reply("w7 w8 w9 w10")
    small.reply("w11")
    assert len(enc.prompt_ids(small.messages("w12"))) > 20  # the whole conversation would not fit ...
    assert len(small.prompt_ids("w12")) <= 20  # ... so the first exchange went
    assert small.history[0] == {"role": "user", "content": "w11"} and len(small.history) == 2


def test_chat_command(folder, capsys, monkeypatch):
    from deltatune.train.commands import run_generate

    monkeypatch.setattr(sys, "stdin", io.StringIO("w7 w8\n\n/reset\nw9 w10\n/exit\nw11\n"))
    code, out, _ = run(capsys, "chat", "--model", folder, "--max-new-tokens", "5", "--precision", "fp32")
    lines = out.strip().splitlines()
    first, second = run_generate(None, folder, ["w7 w8", "w9 w10"], max_new_tokens=5, log=None, precision="fp32")
    assert code == 0
    assert lines[0].startswith("deltatune chat: ") and "(greedy)" in lines[0]
    assert lines[2:] == [f"assistant> {first}", "(conversation reset)", f"assistant> {second}"]  # w11: after /exit


# ----------------------------------------------------------------------------- quiet load


@pytest.mark.integration
def test_loading_the_default_model_from_python_is_quiet():
    code = ("from deltatune.integrations.transformers import load_model_and_tokenizer\n"
            "m, t = load_model_and_tokenizer()\nprint(type(m).__name__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "LlamaForCausalLM"
    for noise in ("Failed to load", "deprecated", "Converting and de-quantizing", "Loading weights", "Warning"):
        assert noise not in out.stderr, out.stderr
