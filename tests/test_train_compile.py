"""Compiled decoder layers (``--torch-compile``, :mod:`deltatune.integrations.hf_compile`):

* a compiled layer computes what the eager one computes: loss and every adapter gradient, LoRA
  and DoRA, float32 and the bf16 fast path, packed rows;
* evaluation, generation and calls with a key/value cache run the eager forward;
* a failure to compile falls back to eager for the rest of the process, with one warning;
* ``auto`` / ``on`` / ``off`` decide as documented, and their errors are one line (CLI: exit 2).

The tests that compile need a C++ compiler (skipped without one); each compiles a tiny model once.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._inductor.exc import InductorError

import deltatune as dt
from conftest import make_tl
from deltatune.integrations import hf_compile
from deltatune.integrations.hf_compile import compile_layers, compiler_available, decoder_layers, uncompile_layers
from deltatune.train.config import UsageError
from deltatune.train.data import collate
from deltatune.train.fastpath import COMPILE_MIN_STEPS, compile_choice, prepare_for_training
from deltatune.train.loss import token_loss_sum
from deltatune.train.packing import pack
from deltatune.train.precision import Precision, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")
needs_compiler = pytest.mark.skipif(not compiler_available("cpu"), reason="no C++ compiler for torch.compile")

ITEMS = [
    {"input_ids": [1, 5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 5 + [9, 10, 11]},
    {"input_ids": [1, 5, 6, 12, 13, 14], "labels": [-100, -100, 6, 12, 13, 14]},
    {"input_ids": [1, 20, 21, 22, 23, 24, 25, 26, 27, 28], "labels": [-100] * 3 + [22, 23, 24, 25, 26, 27, 28]},
]


def _model(method: str, precision: Precision):
    m = make_tl(seed=3)
    prepare_for_training(m, precision)
    cfg = (dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=method == "dora",
                         init_lora_weights=False))
    dt.inject(m, cfg)
    m.train()
    return m


def _loss_and_grads(m, batch, precision):
    for p in m.parameters():
        p.grad = None
    with precision.autocast():
        s, n = token_loss_sum(m, batch)
    (s / n).backward()
    return float(s / n), {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}


@needs_compiler
@pytest.mark.parametrize("method,prec_name,packed", [("lora", "fp32", False), ("lora", "bf16", True),
                                                     ("dora", "fp32", True)])
def test_a_compiled_layer_gives_the_eager_loss_and_gradients(method, prec_name, packed):
    precision = resolve_precision(prec_name, torch.device("cpu"))
    m = _model(method, precision)
    batch = pack(ITEMS, 0) if packed else collate(ITEMS, 0)
    loss_e, grads_e = _loss_and_grads(m, batch, precision)
    torch._dynamo.reset()  # nothing compiled by an earlier case (nor its recompile budget) carries over
    assert compile_layers(m) == 2 and compile_layers(m) == 0  # every layer once
    loss_c, grads_c = _loss_and_grads(m, batch, precision)
    assert hf_compile.compile_failed() is None and hf_compile.compiled_calls() == 2  # compiled code ran, both layers
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    tol = 1e-5 if prec_name == "fp32" else 2e-2  # bf16: fused kernels round at other points than the eager ops
    assert loss_c == pytest.approx(loss_e, rel=tol)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for k in grads_e:
        err = (grads_c[k] - grads_e[k]).abs().max() / grads_e[k].abs().max().clamp_min(1e-12)
        assert err < (1e-4 if prec_name == "fp32" else 5e-2), k
    assert uncompile_layers(m) == 2 and all("forward" not in L.__dict__ for L in decoder_layers(m))
    assert _loss_and_grads(m, batch, precision)[0] == pytest.approx(loss_e, rel=1e-6)


def test_without_gradients_or_with_a_cache_the_layers_run_eagerly():
    """No compiler needed: the compiled callable is replaced by one that counts its calls."""
    m = make_tl(seed=1)
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    compile_layers(m)
    calls = []
    for L in decoder_layers(m):  # records the call, then runs the eager forward
        L._deltatune_compiled = lambda *a, _eager=L._deltatune_eager, **k: (calls.append(1), _eager(*a, **k))[1]
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    out = m(input_ids=ids, use_cache=True)  # gradients on, but a key/value cache: eager
    assert calls == [] and torch.allclose(out.logits, ref)
    m(input_ids=ids, use_cache=False)
    assert len(calls) == 2  # gradients on, no cache: the compiled forward (one call per layer)


def test_a_failure_to_compile_falls_back_to_eager_once_with_a_warning(monkeypatch, caplog):
    m = make_tl(seed=1)
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ref = m(input_ids=ids, use_cache=False).logits.detach()
    compile_layers(m)
    tries = []

    def broken(*a, **k):
        tries.append(1)
        raise InductorError(RuntimeError("no compiler"), None)

    for L in decoder_layers(m):
        L._deltatune_compiled = broken
    with caplog.at_level(logging.WARNING, logger="deltatune.integrations.hf_compile"):
        out = m(input_ids=ids, use_cache=False).logits
        out2 = m(input_ids=ids, use_cache=False).logits
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert tries == [1]  # the first layer tried once; after it, every layer runs eagerly
    assert hf_compile.compile_failed().startswith("InductorError") and hf_compile.compiled_calls() == 0
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
    uncompile_layers(m)
    compile_layers(m)  # a new run tries again
    assert hf_compile.compile_failed() is None


@pytest.mark.parametrize("error", [ValueError("a real error"), torch._dynamo.exc.TorchRuntimeError("a shape error")])
def test_other_errors_in_a_compiled_layer_are_not_swallowed(error):
    """Only Inductor's failure to build the code falls back; a real error (also one met while tracing)
    is raised as it would be eagerly, and compiling stays on."""
    m = make_tl(seed=1)
    compile_layers(m)

    def bad(*a, **k):
        raise error

    for L in decoder_layers(m):
        L._deltatune_compiled = bad
    with pytest.raises(type(error)):
        m(input_ids=torch.tensor([[1, 5, 6]]), use_cache=False)
    assert hf_compile.compile_failed() is None


@pytest.mark.parametrize("kw,expect", [
    (dict(setting="auto", method="lora", steps=COMPILE_MIN_STEPS), (True, "auto")),
    (dict(setting="auto", method="dora", steps=10 * COMPILE_MIN_STEPS), (True, "auto")),
    (dict(setting="auto", method="lora", steps=COMPILE_MIN_STEPS - 1), (False, f"{COMPILE_MIN_STEPS - 1} steps to go")),
    (dict(setting="auto", method="lora", steps=1000, cached_calls=True), (False, "the shared prefix")),
    (dict(setting="on", method="lora", steps=1000, cached_calls=True), (True, "on")),
    (dict(setting="auto", method="loha", steps=1000), (False, "method loha")),
    (dict(setting="auto", method="lora", steps=1000, world=2), (False, "several processes")),
    (dict(setting="off", method="lora", steps=1000), (False, "off")),
    (dict(setting="on", method="loha", steps=1), (True, "on")),
    (dict(setting="auto", method="lora", steps=1000, device_type="cuda"), (False, "not measured")),
    (dict(setting="on", method="lora", steps=1000, device_type="cuda"), (True, "on")),
])
def test_compile_choice_follows_the_documented_rules(monkeypatch, kw, expect):
    monkeypatch.setattr("deltatune.train.fastpath.compiler_available", lambda d: True)
    setting, device_type = kw.pop("setting"), kw.pop("device_type", "cpu")
    got = compile_choice(setting, device_type=device_type, **kw)
    assert got[0] == expect[0] and got[1].startswith(expect[1])


def test_compile_choice_errors_name_the_fix(monkeypatch):
    monkeypatch.setattr("deltatune.train.fastpath.compiler_available", lambda d: False)
    assert compile_choice("auto", device_type="cpu", method="lora", steps=1000) == (False, "no compiler for this device")
    with pytest.raises(UsageError, match=r"needs a C\+\+ compiler .*--torch-compile off"):
        compile_choice("on", device_type="cpu", method="lora", steps=1000)
    with pytest.raises(UsageError, match="needs Triton"):
        compile_choice("on", device_type="cuda", method="lora", steps=1000)
    monkeypatch.setattr("deltatune.train.fastpath.compiler_available", lambda d: True)
    with pytest.raises(UsageError, match="one process"):
        compile_choice("on", device_type="cpu", method="lora", steps=1000, world=2)
    with pytest.raises(UsageError, match="auto, on or off"):
        compile_choice("yes", device_type="cpu", method="lora", steps=1000)
    assert compiler_available("xpu") is False


def test_the_config_takes_yaml_booleans_and_refuses_other_words():
    from deltatune.train.config import OptionError, TrainConfig, _coerce, validate

    assert _coerce("torch_compile", True, "auto") == "on" and _coerce("torch_compile", " OFF ", "auto") == "off"
    with pytest.raises(OptionError, match="'torch_compile' must be auto, on or off"):
        validate(TrainConfig(lr=1e-3, torch_compile="sometimes"))


def test_the_cli_compiles_when_asked_and_records_it_and_refuses_what_cannot_run(tmp_path, capsys, monkeypatch):
    """``train`` with ``--torch-compile on`` switches the layers (torch.compile stubbed to return the
    function itself: no compiling here), says so in its log and report, and switches them back when
    training ends; ``auto`` on a short run does not switch; without a compiler ``on`` is a one-line
    error before the model loads; a word that is not a setting is exit 2."""
    import json

    from conftest import tiny_train_argv
    from deltatune.cli import main
    from deltatune.train import pipeline

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    switched, restored = [], []
    real_compile, real_uncompile = pipeline.compile_layers, pipeline.uncompile_layers
    monkeypatch.setattr(pipeline, "compile_layers", lambda m: switched.append(m) or real_compile(m))
    monkeypatch.setattr(pipeline, "uncompile_layers", lambda m: restored.append(real_uncompile(m)))
    monkeypatch.setattr("deltatune.train.fastpath.compiler_available", lambda d: True)
    base = tiny_train_argv(tmp_path)
    assert main(base + ["--out", str(tmp_path / "a"), "--torch-compile", "on", "--shared-prefix", "off"]) == 0
    out = capsys.readouterr().out
    assert len(switched) == 1 and "compiled layers" in out and "--torch-compile off skips it" in out
    assert hf_compile.compiled_calls() > 0  # the training calls went through the (stub) compiled forward
    assert json.load(open(tmp_path / "a" / "report.json"))["torch_compile"] is True
    assert restored == [2] and all("_deltatune_compiled" not in L.__dict__ for L in decoder_layers(switched[0]))
    # with a shared prefix the calls carrying its cache stay eager, and the log says so
    assert main(base + ["--out", str(tmp_path / "a2"), "--torch-compile", "on", "--shared-prefix", "on"]) == 0
    out = capsys.readouterr().out
    assert "shared prefix's key/value cache run eagerly" in out and "--shared-prefix off compiles every call" in out
    assert main(base + ["--out", str(tmp_path / "b")]) == 0  # auto, 2 steps: not compiled
    assert len(switched) == 2 and "compiled layers" not in capsys.readouterr().out  # the two 'on' runs only
    assert json.load(open(tmp_path / "b" / "report.json"))["torch_compile"] is False
    monkeypatch.setattr("deltatune.train.fastpath.compiler_available", lambda d: False)
    assert main(base + ["--out", str(tmp_path / "c"), "--torch-compile", "on"]) == 2
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and "needs a C++ compiler" in err[0] and "loading model" not in printed.out
    assert not (tmp_path / "c").exists()
    assert main(base + ["--out", str(tmp_path / "d"), "--torch-compile", "sometimes"]) == 2
    assert "auto, on or off" in capsys.readouterr().err and not (tmp_path / "d").exists()
