"""Real SmolLM2-135M-Instruct: train -> save -> load -> eval for a few steps; the saved adapter in real
``peft`` (logits within 1e-4); ``deltatune merge`` output in plain transformers (same greedy answers);
batched greedy evaluation equals one-at-a-time (C21 part 1).

Set ``DELTATUNE_VERIFY_ADAPTER=runs/demo`` to run the peft/merge checks on the demo's adapter (50
held-out words) instead of the short adapter trained here.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from deltatune import delete_adapter, load_adapter
from deltatune.train.config import build_config
from deltatune.train.data import ChatEncoder, end_of_turn_ids, pad_id_of
from deltatune.train.evaluate import Evaluator, evaluation_mode, greedy_generate
from deltatune.train.task import build_task

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _threads():
    """All cores, or one thread when other processes keep the cores busy (see choose_threads)."""
    from deltatune.train.pipeline import choose_threads

    n = torch.get_num_threads()
    torch.set_num_threads(choose_threads(None))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter trained for 4 steps (batch 4) by the real pipeline, and its in-memory session."""
    from deltatune.train.pipeline import train_session

    out = tmp_path_factory.mktemp("sm") / "adapter"
    cfg = build_config({}, {"out": str(out), "max_steps": 4, "batch_size": 4, "task_train_size": 16,
                            "eval_size": 12, "eval_loss_size": 12, "eval_every": 0, "ppl_size": 2,
                            "warmup_steps": 0, "progress": False, "lr": 2e-3,
                            "precision": "fp32"})  # compared below with the fp32 model of conftest
    sess = train_session(cfg, log=None)
    return str(out), sess


def test_train_save_load_eval_on_smollm(trained, smollm):
    out, sess = trained
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["steps"] == 4 and rep["eval_examples"] == 12 and rep["train_tokens"] > 4 * 4 * 38
    assert rep["metric_before"] == 0.0  # the base model answers in sentences
    assert rep["perplexity_before"] > 1 and rep["perplexity_after"] > 1
    assert rep["perplexity_before"] != rep["perplexity_after"]
    assert rep["eval_loss_after"] < rep["eval_loss_before"]  # four steps already teach something
    assert rep["trainable_params"] == 4_884_480  # r=16 on q,k,v,o,gate,up,down x 30 layers
    # load the saved adapter into the (separately loaded) base and evaluate it again
    model, tok = smollm
    load_adapter(model, out)
    try:
        res = sess["evaluator"](model)
        assert res["metric"] == rep["metric_after"]
        assert abs(res["eval_loss"] - rep["eval_loss_after"]) < 1e-4
        x = torch.tensor([ChatEncoder(tok).prompt_ids([{"role": "user", "content": "Give the plural of cat."}])])
        with torch.no_grad():
            d = (model(x).logits - sess["model"](x).logits).abs().max()
        assert float(d) < 1e-4
    finally:
        delete_adapter(model, "default")


def _adapter_dir(trained):
    return os.environ.get("DELTATUNE_VERIFY_ADAPTER") or trained[0]


def test_adapter_loads_into_real_peft_with_same_logits(trained, smollm):
    from peft import PeftModel

    adapter = _adapter_dir(trained)
    model, tok = smollm
    enc = ChatEncoder(tok)
    words = build_task(16, 4, seed=0).eval
    prompts = [enc.prompt_ids(e.prompt_messages()) for e in words]
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    base_copy = copy.deepcopy(model)  # peft replaces modules in place: give it its own copy
    load_adapter(model, adapter)
    try:
        with torch.no_grad():
            ours = model(input_ids=ids, attention_mask=mask).logits
    finally:
        delete_adapter(model, "default")
    peft_model = PeftModel.from_pretrained(base_copy, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, attention_mask=mask).logits
    diff = float((ours - theirs)[mask.bool()].abs().max())
    moved = float((ours - base)[mask.bool()].abs().max())
    print(f"peft interop: max |logits diff| = {diff:.3g} (adapter moved logits by {moved:.3g})")
    assert diff <= 1e-4 and moved > 1e-2


def test_merged_model_gives_same_greedy_answers(trained, smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.train.commands import run_merge

    adapter = _adapter_dir(trained)
    model, tok = smollm
    merged_dir = run_merge(adapter, str(tmp_path / "merged"))
    files = os.listdir(merged_dir)
    assert any(f.endswith(".safetensors") for f in files) and "config.json" in files
    assert not any(f.endswith(".gguf") for f in files)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    n = 50 if os.environ.get("DELTATUNE_VERIFY_ADAPTER") else 12
    words = build_task(16, n, seed=0).eval
    enc = ChatEncoder(tok)
    prompts = [enc.prompt_ids(e.prompt_messages()) for e in words]
    kw = dict(max_new_tokens=8, stop_ids=end_of_turn_ids(tok), pad_id=pad_id_of(tok), batch_size=25)
    load_adapter(model, adapter)
    try:
        with evaluation_mode(model):
            ours = greedy_generate(model, prompts, **kw)
    finally:
        delete_adapter(model, "default")
    with evaluation_mode(plain):
        theirs = greedy_generate(plain, prompts, **kw)
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"merge: {same}/{len(prompts)} greedy answers identical; e.g. {tok.decode(theirs[0])!r}")
    assert same == len(prompts)


def test_c21_batched_equals_single_on_smollm(smollm):
    model, tok = smollm
    enc = ChatEncoder(tok)
    texts = ["Give the past tense of the word: walk", "Give the plural of the word: child", "Give the -ing form of: run"]
    prompts = [enc.prompt_ids([{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) >= 2  # different lengths: padding is needed
    kw = dict(max_new_tokens=8, stop_ids=end_of_turn_ids(tok), pad_id=pad_id_of(tok))
    with evaluation_mode(model):
        single = [greedy_generate(model, [p], **kw)[0] for p in prompts]
        batched = greedy_generate(model, prompts, batch_size=3, **kw)
        tok.padding_side = "right"  # as a training collator may leave it
        try:
            batched_right = greedy_generate(model, prompts, batch_size=3, **kw)
        finally:
            tok.padding_side = "left"
    assert batched == single == batched_right
    assert all(len(s) > 0 for s in single)  # no blank answers
