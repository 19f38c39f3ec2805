"""Fuzzing the inputs a user hands deltatune (hypothesis): whatever the options, config files, data
files, adapter folders and checkpoint files hold, deltatune answers with its own error (one line,
exit code 2 at the command line) or works; it never crashes with another exception, and the
checkpoint codec gives back exactly what it was given."""

from __future__ import annotations

import json
import os
import string

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import make_tl, make_tt, model_folder
from deltatune.cli import build_parser, main
from deltatune.config import config_from_dict, registered_peft_types
from deltatune.train.checkpoint import flatten_state, read_checkpoint, unflatten_state
from deltatune.train.config import OptionError, TrainConfig, build_config
from deltatune.train.data import DataError, load_examples

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
FIELDS = TrainConfig.field_names()
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from([f.replace("_", "-") for f in FIELDS]), st.text(max_size=10))


@FAST
@given(st.dictionaries(keys, json_values, max_size=6), st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4))
def test_options_give_a_config_or_an_option_error(yaml_values, flag_values):
    try:
        cfg = build_config(yaml_values, flag_values)
    except OptionError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(cfg, TrainConfig) and cfg.batch_size > 0 and cfg.lr > 0


def _train_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return sorted(o for a in sub.choices["train"]._actions for o in a.option_strings
                  if o.startswith("--") and o not in ("--help", "--data", "--model", "--resume", "--config"))


@SLOW
@given(st.lists(st.tuples(st.sampled_from(_train_flags()), st.text(string.printable, max_size=8)), max_size=5))
def test_the_train_command_line_gives_one_line_errors(tmp_path, capfd, monkeypatch, flags):
    """Any flags with any values (data and model that are not there, so nothing trains): one line, exit 2,
    nothing written."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "/nonexistent/d.jsonl", "--model", "/nonexistent/m"]
    for flag, value in flags:
        argv += [flag] if flag in ("--overwrite", "--no-plot", "--no-progress") else [flag, value]
    code = main(argv)
    err = capfd.readouterr()[1]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deltatune: error: "), (argv, err)
    assert os.listdir(tmp_path) == []


rows = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"prompt": json_values, "completion": json_values, "system": json_values}),
    st.fixed_dictionaries({}, optional={"messages": st.lists(st.fixed_dictionaries(
        {}, optional={"role": st.sampled_from(["user", "assistant", "system", "robot", 5]), "content": json_values}),
        max_size=3)}),
    st.fixed_dictionaries({}, optional={"instruction": json_values, "input": json_values, "output": json_values,
                                        "text": json_values}),
)


@FAST
@given(st.lists(rows, max_size=4), st.sampled_from([".jsonl", ".json"]), st.binary(max_size=16),
       st.booleans())
def test_data_files_give_examples_or_a_data_error(tmp_path_factory, rows_, ext, junk, add_junk):
    path = tmp_path_factory.mktemp("d") / f"data{ext}"
    text = (json.dumps(rows_) if ext == ".json" else "".join(json.dumps(r) + "\n" for r in rows_)).encode()
    path.write_bytes(text + (junk if add_junk else b""))
    try:
        examples = load_examples(str(path))
    except DataError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert examples and all(e.messages or e.text for e in examples)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("m") / "tl", make_tl(), make_tt())


def _adapter(tmp_path, config, weights: bytes = None):
    d = tmp_path / "ad"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps(config))
    if weights is not None:
        (d / "adapter_model.safetensors").write_bytes(weights)
    return str(d)


def _lora_weights(r=2):
    from safetensors.torch import save

    t = {}
    for i in range(2):
        for proj, (o, n) in (("q_proj", (32, 32)), ("v_proj", (16, 32))):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            t[f"{key}.lora_A.weight"] = torch.randn(r, n)
            t[f"{key}.lora_B.weight"] = torch.randn(o, r)
    return save(t)


config_fields = st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
                     "init_lora_weights", "rank_pattern", "modules_to_save", "layers_to_transform", "fan_in_fan_out",
                     "base_model_name_or_path", "num_virtual_tokens", "feedforward_modules", "task_type"]),
    json_values, max_size=4)


@SLOW
@given(st.one_of(st.sampled_from(registered_peft_types()), json_values), config_fields)
def test_adapter_configs_load_or_give_one_line(tiny, tmp_path_factory, capfd, peft_type, fields):
    """An adapter config of any shape, with LoRA weights: generate works, or one line with exit 2."""
    tmp = tmp_path_factory.mktemp("a")
    cfg = {"peft_type": peft_type, "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **fields}
    ad = _adapter(tmp, cfg, _lora_weights())
    code = main(["generate", "--adapter", ad, "--model", tiny, "--prompt", "w7", "--max-new-tokens", "1",
                 "--threads", "1", "--precision", "fp32"])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code in (0, 2), (cfg, err)
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("deltatune: error: "), (cfg, err)


@FAST
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_config_from_any_dict_is_a_config_or_a_value_error(d):
    try:
        cfg = config_from_dict(d)
    except ValueError as e:
        assert str(e)
        return
    assert cfg.peft_type == d["peft_type"]


@SLOW
@given(st.one_of(st.binary(max_size=200), st.builds(lambda b, n: _lora_weights()[:n] + b, st.binary(max_size=20),
                                                    st.integers(0, len(_lora_weights()) - 1))))  # cut short
def test_damaged_weights_files_give_one_line(tiny, tmp_path_factory, capfd, blob):
    # a cut whose appended bytes restore the full length is a whole file with other values, not damage
    assume(len(blob) != len(_lora_weights()))
    ad = _adapter(tmp_path_factory.mktemp("w"), {"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                 "target_modules": ["q_proj", "v_proj"]}, blob)
    for argv in (["inspect", ad], ["eval", "--adapter", ad, "--model", tiny, "--eval-size", "1"]):
        code = main(argv)
        lines = capfd.readouterr()[1].strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("deltatune: error: "), (argv, lines)


tensors = st.builds(lambda shape, dtype: torch.randn(shape).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3),
                    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]))
states = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=False), st.text(max_size=6),
              tensors),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 9)), inner, max_size=3)),
    max_leaves=10)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@FAST
@given(states)
def test_the_checkpoint_codec_gives_back_exactly_what_it_was_given(state):
    from safetensors.torch import load, save

    js, tens = flatten_state({"s": state})
    back = unflatten_state(json.loads(json.dumps(js)), load(save(tens)) if tens else {})
    assert _same(back, {"s": state})


@FAST
@given(json_values, st.binary(max_size=64))
def test_a_damaged_checkpoint_is_one_usage_error(tmp_path_factory, body, blob):
    from deltatune.train.config import UsageError

    d = tmp_path_factory.mktemp("c")
    (d / "state.json").write_text(json.dumps(body))
    (d / "state.safetensors").write_bytes(blob)
    with pytest.raises(UsageError, match="is damaged"):
        read_checkpoint(str(d))
    assume(True)
