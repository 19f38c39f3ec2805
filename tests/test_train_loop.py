"""The training loop on TL + TT: accumulation normalisation (C16), schedule counted in optimizer steps
(C23), end-of-turn learned with pad = eos (C17 part 2), evaluation leaves training untouched (C25)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import make_dv, make_tl, make_tt, tt_words
from deltatune import LoraConfig, disable_adapter, inject, load_adapter, save_adapter
from deltatune.train.data import IGNORE_INDEX, ChatEncoder, Example, collate
from deltatune.train.evaluate import Evaluator, PerplexityProbe, evaluation_mode, greedy_generate
from deltatune.train.loop import Trainer, lr_factor, plan_windows


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_tl(seed=0, init=True, **kw):
    model = make_tl(seed=seed, **{k: v for k, v in kw.items() if k == "attention_dropout"})
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    cfg.update({k: v for k, v in kw.items() if k != "attention_dropout"})
    torch.manual_seed(seed)
    inject(model, LoraConfig(**cfg))
    return model


def encode_convs(tok, convs):
    enc = ChatEncoder(tok)
    return [enc.encode(Example(messages=m)) for m in convs]


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- C16


def c16_items(tok):
    rng = random.Random(1)
    convs = []
    for u, a in ((5, 1), (3, 2), (8, 4), (2, 9)):
        convs.append([{"role": "user", "content": tt_words(rng.randint(6, 127) for _ in range(u))},
                      {"role": "assistant", "content": tt_words(rng.randint(6, 127) for _ in range(a))}])
    items = encode_convs(tok, convs)
    assert [sum(lab != IGNORE_INDEX for lab in it["labels"]) for it in items] == [2, 3, 5, 10]
    return items


def c16_reference(items):
    model = lora_tl(init=False)
    batch = collate(items, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    y = batch["labels"][:, 1:]
    sel = y != IGNORE_INDEX
    loss = -lp[sel].gather(-1, y[sel][:, None]).sum() / 20
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads


def one_step(items, batch_size, grad_accum, max_grad_norm=None):
    model = lora_tl(init=False)
    tr = Trainer(model, items, pad_id=0, lr=1e-3, batch_size=batch_size, grad_accum=grad_accum, max_steps=1,
                 max_grad_norm=max_grad_norm)
    assert tr.total_steps == 1
    captured = {}

    def pre(opt, args, kwargs):
        captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    tr.optimizer.register_step_pre_hook(pre)
    tr.fit()
    return tr.history[0].loss, captured, adapter_tensors(model)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("batch_size, grad_accum, reverse", [(4, 1, False), (1, 4, False), (2, 2, False),
                                                             (1, 4, True)])
def test_c16_gradient_and_logged_loss_independent_of_split(batch_size, grad_accum, reverse):
    items = c16_items(make_tt())
    ref_loss, ref_grads = c16_reference(items)
    loss, grads, _ = one_step(items[::-1] if reverse else items, batch_size, grad_accum)
    assert abs(loss - ref_loss) / ref_loss < 1e-6
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert rel(grads[n], ref_grads[n]) < 1e-5, n


def test_c16_faulty_rule_would_differ():
    """Teeth: averaging per-micro-batch means (the fault) gives a clearly different gradient."""
    items = c16_items(make_tt())
    _, ref = c16_reference(items)
    model = lora_tl(init=False)
    for it in items:
        b = collate([it], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        y = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), y.reshape(-1))
        (loss / 4).backward()
    worst = max(rel(p.grad, ref[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert worst > 0.2


def test_c16_clipping_takes_one_norm_per_optimizer_step():
    items = c16_items(make_tt())
    _, _, after_a = one_step(items, 4, 1, max_grad_norm=1e-3)
    _, _, after_b = one_step(items, 1, 4, max_grad_norm=1e-3)
    _, _, unclipped = one_step(items, 4, 1)
    for n in after_a:
        assert torch.allclose(after_a[n], after_b[n], atol=1e-7, rtol=1e-5), n
    assert any(not torch.allclose(after_a[n], unclipped[n], atol=1e-9) for n in after_a)


# ----------------------------------------------------------------------------- C23


def run_c23(n_convs, epochs, max_steps=None):
    tok = make_tt()
    items = encode_convs(tok, make_dv(n_convs))
    model = lora_tl()
    tr = Trainer(model, items, pad_id=0, lr=1e-3, warmup_steps=2, schedule="cosine", batch_size=2, grad_accum=4,
                 epochs=epochs, max_steps=max_steps, seed=0, warmup_from_zero=True)
    lrs, steps = [], []
    model.register_forward_pre_hook(lambda m, a: lrs.append(tr.optimizer.param_groups[0]["lr"]))
    tr.optimizer.register_step_post_hook(lambda opt, a, k: steps.append(1))
    tr.fit()
    return tr, lrs, len(steps)


def test_c23_schedule_counts_optimizer_steps():
    tr, lrs, n_opt = run_c23(16, epochs=3)
    assert n_opt == 6 and tr.total_steps == 6 and len(lrs) == 24
    per_step = [lrs[4 * k] for k in range(6)]
    for k in range(6):  # constant inside a window
        assert lrs[4 * k: 4 * k + 4] == [per_step[k]] * 4
    expected = [0.0, 5e-4, 1e-3, 8.5355339059e-4, 5e-4, 1.4644660941e-4]
    expected[3:] = [1e-3 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0.25, 0.5, 0.75)]
    for got, want in zip(per_step, expected):
        assert abs(got - want) < 1e-9
    assert abs(per_step[3] - 8.5355e-4) < 1e-8 and abs(per_step[5] - 1.4645e-4) < 1e-8
    assert tr.optimizer.param_groups[0]["lr"] == 0.0  # the scheduler stands at its end
    assert [h.step for h in tr.history] == [1, 2, 3, 4, 5, 6]


def test_c23_max_steps_sizes_the_schedule():
    tr, lrs, n_opt = run_c23(16, epochs=3, max_steps=5)
    assert n_opt == 5 and len(lrs) == 20
    per_step = [lrs[4 * k] for k in range(5)]
    expected = [1e-3 * lr_factor(s, 5, 2, warmup_from_zero=True) for s in range(5)]
    # the default warm-up (deltatune train's too): the first step already learns, at lr / W
    assert [lr_factor(s, 5, 2) for s in range(2)] == [0.5, 1.0] and Trainer.warmup_from_zero is False
    assert expected[2] == 1e-3 and abs(expected[4] - 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3))) < 1e-15
    assert all(abs(a - b) < 1e-9 for a, b in zip(per_step, expected))
    assert tr.optimizer.param_groups[0]["lr"] == 0.0


def test_c23_short_window_is_stepped_and_normalised_by_its_own_tokens():
    plan = plan_windows(20, batch_size=2, grad_accum=4, epochs=2, seed=0)
    assert [len(w) for w in plan] == [4, 4, 2, 4, 4, 2]
    for e in range(2):  # no window spans two epochs: each epoch covers all 20 examples once
        idx = sorted(i for w in plan[3 * e: 3 * e + 3] for mb in w for i in mb)
        assert idx == list(range(20))
    tok = make_tt()
    items = encode_convs(tok, make_dv(20))
    model = lora_tl()
    tr = Trainer(model, items, pad_id=0, lr=1e-3, warmup_steps=2, batch_size=2, grad_accum=4, epochs=2, seed=0)
    assert tr.total_steps == 6
    refs = []

    def pre(opt, a, k):  # params are still those the window was computed with
        w = tr.plan[tr.step]
        its = [items[i] for mb in w for i in mb]
        with torch.no_grad():
            b = collate(its, 0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            y = b["labels"][:, 1:]
            refs.append(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), y.reshape(-1))))

    tr.optimizer.register_step_pre_hook(pre)
    tr.fit()
    for h, r in zip(tr.history, refs):
        assert abs(h.loss - r) / r < 1e-5
    assert abs(tr.history[2].loss - refs[2]) / refs[2] < 1e-5  # the short window


# ----------------------------------------------------------------------------- C17 part 2


def c17_tasks():
    rng = random.Random(0)
    As = rng.sample(range(6, 128), 8)
    return [(a, 6 + (37 * a) % 120) for a in As]


def train_c17(mask_end: bool):
    tok = make_tt(pad_is_end=True)
    assert tok.pad_token_id == tok.eos_token_id == 5
    tasks = c17_tasks()
    convs = [[{"role": "user", "content": f"w{a}"}, {"role": "assistant", "content": f"w{b}"}] for a, b in tasks]
    items = encode_convs(tok, convs)
    for it in items:
        assert it["labels"][-2:] == [it["input_ids"][-2], 5]  # answer and <|end|> are targets
        if mask_end:
            it["labels"][-1] = IGNORE_INDEX
    model = make_tl()
    torch.manual_seed(0)
    inject(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    Trainer(model, items, pad_id=5, lr=1e-2, batch_size=8, max_steps=300, schedule="constant").fit()
    enc = ChatEncoder(tok)
    prompts = [enc.prompt_ids(c[:1]) for c in convs]
    with evaluation_mode(model):
        raw = greedy_generate(model, prompts, max_new_tokens=6, stop_ids=[], pad_id=5)
        stopped = greedy_generate(model, prompts, max_new_tokens=6, stop_ids=[5], pad_id=5)
    return tasks, raw, stopped


def test_c17_end_of_turn_is_learned_with_pad_eq_eos():
    tasks, raw, stopped = train_c17(mask_end=False)
    good = sum(r[:2] == [b, 5] for (a, b), r in zip(tasks, raw))
    assert good >= 7
    # the evaluation path stops at <|end|> and the scored answer excludes it
    assert sum(s == [b] for (a, b), s in zip(tasks, stopped)) >= 7


def test_c17_control_masked_end_of_turn_never_stops():
    tasks, raw, _ = train_c17(mask_end=True)
    assert sum(r[:2] == [b, 5] for (a, b), r in zip(tasks, raw)) <= 1


# ----------------------------------------------------------------------------- C25


def test_scoring_draws_nothing_from_the_global_rngs():
    """train_session injects the adapter (initial values from torch's global RNG) and then scores the
    base model inside disable_adapter: building and calling Evaluator and PerplexityProbe must leave
    torch's and Python's global RNG as they found them, so the order cannot move any number."""
    tok = make_tt()
    held = [Example(messages=m) for m in make_dv(8)]
    model = lora_tl(lora_dropout=0.5, target_modules="all-linear", attention_dropout=0.1)
    model.train()
    torch.manual_seed(123)
    random.seed(123)
    t0, p0 = torch.random.get_rng_state(), random.getstate()
    ev = Evaluator(tok, held, ChatEncoder(tok), size=4, loss_size=4, max_new_tokens=4)
    probe = PerplexityProbe(tok, 3)
    with disable_adapter(model):
        base = (ev(model, 0)["eval_loss"], probe(model))
    adapted = (ev(model, 0)["eval_loss"], probe(model))
    assert torch.equal(torch.random.get_rng_state(), t0) and random.getstate() == p0
    assert model.training and base == adapted  # a fresh LoRA (B = 0) computes the base


def c25_run(tmp_path, with_eval: bool, name: str):
    tok = make_tt()
    dv = make_dv(20)
    train_items = encode_convs(tok, dv[:16])
    held = [Example(messages=m) for m in dv[16:]]
    model = lora_tl(lora_dropout=0.5, target_modules="all-linear", attention_dropout=0.1)
    ev = Evaluator(tok, held, ChatEncoder(tok), size=4, loss_size=4, max_new_tokens=6)
    ev.max_new_tokens = 6
    records = []  # (phase, grad_enabled, dropout flags)
    phase = {"now": "train"}
    drop = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) or type(m).__name__ == "LlamaAttention"]
    assert any(isinstance(m, torch.nn.Dropout) for m in drop)
    model.register_forward_pre_hook(
        lambda m, a: records.append((phase["now"], torch.is_grad_enabled(), tuple(d.training for d in drop))))
    evals = {}

    def evaluate(m, step):
        grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters() if p.requires_grad}
        phase["now"] = "eval"
        res = ev(m, step)
        res["tokens"] = None
        with evaluation_mode(m):
            res["tokens"] = greedy_generate(m, ev.prompts, max_new_tokens=6, stop_ids=[], pad_id=0)
        phase["now"] = "after_eval"
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert (grads[n] is None and p.grad is None) or torch.equal(grads[n], p.grad)
        evals[step] = res
        return res

    def checkpoint(step):
        if step == 4:
            save_adapter(model, str(tmp_path / f"{name}-step4"))

    def on_step(log):
        phase["now"] = "train"

    tr = Trainer(model, train_items, pad_id=0, lr=1e-3, batch_size=4, max_steps=8, seed=0,
                 eval_every=2 if with_eval else 0, eval_at_start=with_eval, save_every=2,
                 evaluate=evaluate if with_eval else None, checkpoint=checkpoint, on_step=on_step)
    tr.fit()
    return model, ev, records, evals


def test_c25_evaluation_in_eval_mode_without_grad_and_without_side_effects(tmp_path):
    model, ev, records, evals = c25_run(tmp_path, True, "on")
    assert sorted(evals) == [0, 2, 4, 6, 8]
    ev_recs = [r for r in records if r[0] == "eval"]
    assert ev_recs and all(not g and not any(flags) for _, g, flags in ev_recs)
    # the first training forward after each evaluation runs with dropout on and grad on again
    for i, r in enumerate(records[1:], 1):
        if records[i - 1][0] == "eval" and r[0] != "eval":
            assert r[1] and all(r[2])
    train_recs = [r for r in records if r[0] != "eval"]
    assert train_recs and all(g and all(flags) for _, g, flags in train_recs)

    # the step-4 adapter evaluated on its own (fresh model, two different seeds) equals the in-training eval
    outs = []
    for seed in (1, 2):
        fresh = make_tl(attention_dropout=0.1)
        load_adapter(fresh, str(tmp_path / "on-step4"))
        fresh.train()  # whatever mode it is left in, evaluation must switch dropout off
        torch.manual_seed(seed)
        res = ev(fresh, 4)
        with evaluation_mode(fresh):
            toks = greedy_generate(fresh, ev.prompts, max_new_tokens=6, stop_ids=[], pad_id=0)
        outs.append((res["eval_loss"], toks))
    assert outs[0][1] == outs[1][1] == evals[4]["tokens"]
    assert abs(outs[0][0] - outs[1][0]) < 1e-6 and abs(outs[0][0] - evals[4]["eval_loss"]) < 1e-6

    # evaluation changes nothing in training: same final adapter with evaluation off
    model_off, _, _, _ = c25_run(tmp_path, False, "off")
    on, off = adapter_tensors(model), adapter_tensors(model_off)
    for n in on:
        assert torch.allclose(on[n], off[n], atol=1e-6, rtol=0), n
