"""The fast training path computes what the plain path computes:

* the head path of the loss (target rows through the head in chunks) == the logits path, loss and
  gradients, adapters and full fine-tuning, any chunk size; nothing of vocabulary width is kept for
  the backward pass;
* packed rows and a shared prefix give the padded batch's loss and gradients, and a whole run
  with them ends with the same adapter;
* bf16 training stays within 0.02 (mean absolute, per step) of fp32 training;
* the length-aware attention equals SDPA; device and precision choices, and their errors.
Tests marked ``cuda`` run only where a CUDA GPU is visible (``bench/gpu_check.sh``).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_tg, make_tl, tiny_train_argv
from deltatune.train.data import collate
from deltatune.train.loop import Trainer
from deltatune.train.loss import head_cross_entropy, token_loss_sum
from deltatune.train.packing import batching_agrees, pack, share_prefix, shared_prefix_length
from deltatune.train.precision import Precision, resolve_device, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = [1, 5, 6, 7, 8]
ITEMS = [  # three conversations sharing a 5-token prefix that holds no target, of different lengths
    {"input_ids": PRE + [9, 10, 11], "labels": [-100] * 6 + [10, 11]},
    {"input_ids": PRE + [12, 13, 14, 15, 16, 17, 18], "labels": [-100] * 7 + [14, 15, 16, 17, 18]},
    {"input_ids": PRE + [20], "labels": [-100] * 5 + [20]},
    {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
]


def _model(kind, **kw):
    if kind == "TG":  # train mode: no base dropout, so that two paths see the same network
        kw = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **kw}
    return {"TL": make_tl, "TG": make_tg}[kind](**kw)


def _adapted(kind, full=False):
    m = _model(kind)
    if full:
        for p in m.parameters():
            p.requires_grad_(True)
    else:
        dt.inject(m, dt.LoraConfig(r=4, target_modules="all-linear" if kind == "TL" else ["c_attn", "c_fc"]))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.train()


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    s, n = token_loss_sum(model, batch, **kw)
    s.backward()
    return float(s), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    assert a[1] == b[1]
    assert abs(a[0] - b[0]) <= tol * max(1.0, abs(b[0])), (a[0], b[0])
    assert a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        assert torch.allclose(a[2][k], b[2][k], atol=tol, rtol=tol), k


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full-fine-tuning"])
@pytest.mark.parametrize("kind", ["TL", "TG"])
def test_head_path_equals_logits_path(kind, full):
    m = _adapted(kind, full)
    b = collate(ITEMS, 0)
    _close(_loss_and_grads(m, b), _loss_and_grads(m, b, head_path=False))


def test_head_path_chunks_and_accuracy():
    g = torch.Generator().manual_seed(0)
    h, w, bias = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g), torch.randn(11, generator=g)
    y = torch.randint(0, 11, (7,), generator=g)
    ref = nn.functional.cross_entropy(h @ w.T + bias, y, reduction="sum")
    hits = int(((h @ w.T + bias).argmax(-1) == y).sum())
    for chunk in (1, 3, 7, 100):
        hh = h.clone().requires_grad_(True)
        total, correct = head_cross_entropy(hh, w, bias, y, chunk=chunk, count_correct=True)
        total.backward()
        hr = h.clone().requires_grad_(True)
        nn.functional.cross_entropy(hr @ w.T + bias, y, reduction="sum").backward()
        assert abs(float(total) - float(ref)) < 1e-5 and correct == hits
        assert torch.allclose(hh.grad, hr.grad, atol=1e-6)


def test_head_path_keeps_nothing_of_vocabulary_width_for_backward():
    """Peak memory does not grow with the vocabulary: the saved tensors of the head path are the
    hidden rows' gradients (N, D); the logits path keeps (N, V) logits."""
    m = _adapted("TL")
    V = m.config.vocab_size
    b = collate(ITEMS, 0)
    for head_path, expect_wide in ((True, False), (False, True)):
        widths = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: widths.append(t.shape[-1] if t.dim() else 0) or t,
                                                      lambda t: t):
            token_loss_sum(m, b, head_path=head_path)
        assert (V in widths) == expect_wide, (head_path, sorted(set(widths)))


def test_head_path_steps_aside_for_a_head_with_adapters():
    m = _model("TL")
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    b = collate(ITEMS, 0)
    _close(_loss_and_grads(m, b), _loss_and_grads(m, b, head_path=False))
    assert "forward" not in m.lm_head.__dict__  # the head was never stood aside


@pytest.mark.parametrize("kind", ["TL", "TG"])
def test_packed_rows_and_shared_prefix_give_the_padded_loss(kind):
    m = _adapted(kind)
    padded = _loss_and_grads(m, collate(ITEMS, 0))
    packed = pack(ITEMS, 0)
    assert packed["input_ids"].shape[0] < len(ITEMS) and packed["attention_mask"] is None
    _close(_loss_and_grads(m, packed), padded)
    three = ITEMS[:3]
    shared = share_prefix(three, 0)
    # the third example's first target (position 5) is predicted from position 4: the prefix stops before it
    assert shared["prefix_ids"].tolist() == [PRE[:4]] and shared["input_ids"].shape == (3, 8)
    _close(_loss_and_grads(m, shared), _loss_and_grads(m, collate(three, 0)))


def test_pack_layout_and_fallback():
    b = pack(ITEMS, 0)
    # longest first: the 12-token example alone; the 8- and 4-token ones share a row (12 slots)
    assert b["input_ids"][0].tolist() == ITEMS[1]["input_ids"]
    row = b["input_ids"][1].tolist()
    assert row[:8] == ITEMS[0]["input_ids"] and row[8:12] == ITEMS[3]["input_ids"]
    assert b["position_ids"][1].tolist() == list(range(8)) + list(range(4))
    assert b["labels"][1, 8].item() == -100  # nothing predicts an example's first token
    assert b["lengths"].tolist() == [8, 12, 6, 4]
    same = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 3  # nothing fits beside anything: padded
    assert "position_ids" not in pack(same, 0)


def test_shared_prefix_stops_before_the_first_target_and_needs_enough_tokens():
    items = [{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]},
             {"input_ids": [1, 2, 3, 4, 5, 9], "labels": [-100, -100, 3, 4, 5, 9]}]
    assert shared_prefix_length(items) == 1  # the target at position 2 is predicted from position 1
    assert share_prefix(items, 0) is None  # fewer than 4 tokens: not worth a second call
    assert share_prefix(ITEMS[:1], 0) is None


class BagOfWords(nn.Module):
    """A causal LM that ignores positions and masks (running mean of embeddings): packed rows leak."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(128, 8), nn.Linear(8, 128)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, **kw):
        e = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]

        class Out(dict):
            pass

        o = Out(logits=self.head(e))
        o.logits = o["logits"]
        return o


def test_batching_check_refuses_a_model_that_leaks_across_examples():
    cpu = Precision(torch.device("cpu"))
    assert batching_agrees(_adapted("TL"), ITEMS, 0, cpu, pack)
    torch.manual_seed(0)
    assert not batching_agrees(BagOfWords(), ITEMS, 0, cpu, pack)


def _train(model, items, steps=6, **kw):
    tr = Trainer(model, items, lr=5e-3, batch_size=3, max_steps=steps, seed=0, **kw)
    tr.fit()
    return [h.loss for h in tr.history], {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _conversations(n=24):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        q = torch.randint(9, 120, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        a = torch.randint(9, 120, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        ids = PRE + q + a + [2]
        out.append({"input_ids": ids, "labels": [-100] * (len(PRE) + len(q)) + a + [2]})
    return out


@pytest.mark.parametrize("how", ["packing", "shared_prefix"])
def test_a_run_with_packed_rows_or_a_shared_prefix_ends_with_the_same_adapter(how):
    items = _conversations()
    ref_losses, ref = _train(_adapted("TL"), items)
    losses, got = _train(_adapted("TL"), items, **{how: True})
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k


def test_bf16_training_tracks_fp32_training():
    items = _conversations(48)
    fp32, _ = _train(_adapted("TL"), items, steps=16)
    bf16_model = _adapted("TL").to(torch.bfloat16)
    for p in bf16_model.parameters():  # adapters stay float32, as deltatune train holds them
        if p.requires_grad:
            p.data = p.data.float()
    bf16, _ = _train(bf16_model, items, steps=16, precision=Precision(torch.device("cpu"), torch.bfloat16),
                     shared_prefix=True)
    assert sum(abs(a - b) for a, b in zip(fp32, bf16)) / len(fp32) < 0.02


def test_length_aware_attention_equals_sdpa_and_keeps_sdpa_for_inference(monkeypatch):
    from deltatune.integrations import hf_attention

    m = _adapted("TL").eval()
    ids = torch.tensor([[0, 0, 5, 17, 42, 9], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    res = {}
    for impl in ("sdpa", "deltatune"):
        if impl == "deltatune":
            assert hf_attention.use_length_aware_attention(m) and m.config._attn_implementation == "deltatune"
        m.zero_grad(set_to_none=True)
        y = m(input_ids=ids, attention_mask=mask).logits * mask[:, :, None]
        y.pow(2).sum().backward()
        res[impl] = (y.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert torch.allclose(res["sdpa"][0], res["deltatune"][0], atol=1e-5)
    for k, g in res["sdpa"][1].items():
        assert torch.allclose(g, res["deltatune"][1][k], atol=1e-5), k
    calls = []
    monkeypatch.setattr(hf_attention, "_explicit", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask)  # inference: SDPA, never the explicit form
    assert not calls


def test_explicit_attention_with_a_static_cache_equals_no_cache():
    """A static cache's prefill passes no mask and more keys than queries (the rest are unfilled
    slots): the explicit form (gradients on) aligns causality top-left as SDPA's is_causal does,
    so the logits equal a forward without a cache (it aligned bottom-right: the queries attended
    to the empty slots)."""
    from transformers import StaticCache

    from deltatune.integrations import hf_attention

    m = _adapted("TL").eval()
    assert hf_attention.use_length_aware_attention(m)
    ids = torch.tensor([[5, 17, 42, 9, 63, 2, 11]])
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    out = m(input_ids=ids, past_key_values=StaticCache(config=m.config, max_cache_len=16), use_cache=True).logits
    assert out.requires_grad  # gradients on, 16 keys: the explicit form
    assert torch.allclose(out.detach(), ref, atol=1e-5), float((out.detach() - ref).abs().max())


def test_precision_and_device_choices(monkeypatch):
    cpu = torch.device("cpu")
    from deltatune.train import precision as P

    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", cpu).dtype is torch.bfloat16
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", cpu).dtype is None and resolve_precision("bf16", cpu).name == "bf16"
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("fp8", cpu)
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="none is visible"):
            resolve_device("cuda")


def test_cli_records_the_path_and_refuses_a_missing_gpu_and_a_bad_allocator_setting(tmp_path, capsys, monkeypatch):
    from deltatune.cli import main

    base = tiny_train_argv(tmp_path)
    assert main(base + ["--out", str(tmp_path / "a"), "--precision", "fp32", "--packing", "off",
                        "--shared-prefix", "on"]) == 0
    rep = json.load(open(tmp_path / "a" / "report.json"))
    assert rep["precision"] == "fp32" and rep["packing"] is False and rep["shared_prefix"] is True
    assert rep["device"] == "cpu" and rep["attention"] == "deltatune"
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(base + ["--out", str(tmp_path / "b"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "none is visible" in err[0]
        assert not (tmp_path / "b").exists()
    monkeypatch.setenv("DELTATUNE_MALLOC", "sytem")  # a typo: an error before the model loads, not silently "keep"
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c"), "--device", "cpu"]) == 2
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and "DELTATUNE_MALLOC='sytem'" in err[0] and "'system'" in err[0], err
    assert "loading model" not in printed.out  # refused before the model loads
    assert not (tmp_path / "c").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_matches_cpu():
    items = _conversations(12)
    cpu_losses, _ = _train(_adapted("TL"), items, steps=3)
    m = _adapted("TL").cuda()
    gpu_losses, _ = _train(m, items, steps=3, precision=Precision(torch.device("cuda")))
    assert max(abs(a - b) for a, b in zip(cpu_losses, gpu_losses)) < 1e-3
    m16 = _adapted("TL").cuda().to(torch.bfloat16)
    for p in m16.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    bf16, _ = _train(m16, items, steps=3, precision=resolve_precision("bf16", torch.device("cuda")), shared_prefix=True)
    assert max(abs(a - b) for a, b in zip(cpu_losses, bf16)) < 0.05


def test_head_path_in_bf16_keeps_a_confident_rows_loss_and_gradient():
    """bf16 logits, softmax written in bf16: a row with p_y ~ 0.999 keeps its loss (~1e-3) and its
    gradient ``p_y - 1`` to float32 precision (the rounded p_y alone would give 0 or -2^-8)."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 12, 16, 300
    w = torch.randn(V, D, generator=g).to(torch.bfloat16)
    h = torch.randn(N, D, generator=g)
    y = (h @ w.float().T).argmax(-1)
    h = (h * 6).to(torch.bfloat16)  # sharp rows: the label's probability near 1
    logits = (h.float() @ w.float().T).to(torch.bfloat16).double()  # what the path computes, then exact maths
    p = logits.softmax(-1)
    p_y = p[torch.arange(N), y]
    assert int((p_y > 0.999).sum()) >= 4 and bool((p_y < 0.5).any())  # both branches: log1p(-rest) and log p_y
    ref_loss = -p[torch.arange(N), y].log()
    dlogits = p.clone()
    dlogits[torch.arange(N), y] -= 1
    ref_grad = dlogits @ w.double()
    hh = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = head_cross_entropy(hh, w, None, y, chunk=5)
    total.backward()
    assert abs(float(total) - float(ref_loss.sum())) < 2e-3 * float(ref_loss.sum()) + 1e-6
    err = (hh.grad.double() - ref_grad).norm(dim=1) / ref_grad.norm(dim=1)  # per row: the confident ones too
    assert float(err.max()) < 2e-2, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_path_gives_a_very_unlikely_target_its_whole_loss(dtype):
    """A target far below the most likely token (p_y under the dtype's smallest number) gets its
    whole loss, as F.cross_entropy on the same logits gives it (the softmax's p_y underflowed to 0
    and the loss stopped at 87.3 = -log of float32's smallest normal; at 16.6 in fp16)."""
    N, D, V = 6, 4, 50
    w = torch.zeros(V, D)
    w[:, 0] = torch.linspace(-1, 1, V)
    h = torch.zeros(N, D)
    h[:, 0] = torch.tensor([1.0, 4.0, 10.0, 60.0, 100.0, 200.0])  # logit gaps up to 400
    y = torch.zeros(N, dtype=torch.long)  # the least likely token of every row
    w, h = w.to(dtype), h.to(dtype)
    logits = (h.float() @ w.float().T).to(dtype).double()  # what the path computes, then exact maths
    ref = -logits.log_softmax(-1)[torch.arange(N), y]
    assert float(ref.max()) > 300
    total, _ = head_cross_entropy(h.clone().requires_grad_(True), w, None, y, chunk=4)
    assert abs(float(total) - float(ref.sum())) < 1e-3 * float(ref.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_path_loss_of_each_row_on_both_sides_of_the_smallest_normal_probability(dtype):
    """Row by row against exact maths on the same (rounded) logits: a target probability p_y well
    inside the dtype's range (log p_y from the softmax), 16x above and 16x below its smallest normal
    number (below: from the logit gap and the top probability), and a confident row (1 - p_y summed
    from the others)."""
    V = 50
    tiny = torch.finfo(dtype).tiny
    # p_y = e^-g / (V - 1 + e^-g) for a target logit -g and the others 0
    gaps = [2.0, -math.log(16 * tiny * (V - 1)), -math.log(tiny / 16 * (V - 1))]
    rows = [[0.0] * V for _ in gaps] + [[0.0] * V]
    for r, g in zip(rows, gaps):
        r[0] = -g
    rows[-1][0] = 12.0  # a confident row: p_y ~ 1 - 3e-4
    h = torch.tensor(rows).to(dtype)
    w = torch.eye(V, dtype=dtype)  # logits = h, exactly
    ref = -h.double().log_softmax(-1)[:, 0]
    p_y = ref.neg().exp()
    assert p_y[1] > tiny and p_y[2] < tiny  # the two sides of the dtype's smallest normal number
    for i in range(len(rows)):
        got, _ = head_cross_entropy(h[i:i + 1], w, None, torch.zeros(1, dtype=torch.long))
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # the softmax's p_y rounded to the dtype: 2^-9 relative
        scale = float(ref[i]) if i == 3 else max(1.0, float(ref[i]))  # the confident row's small loss: relative
        assert abs(float(got) - float(ref[i])) <= tol * scale, (i, float(got), float(ref[i]))


def test_head_path_steps_aside_for_a_soft_capped_head():
    """Gemma 2 soft-caps its logits (tanh(z / 30) * 30): the head path, which computes h @ W.T,
    steps aside and the loss and gradients are the model's own logits'."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, vocab_size=128)
    assert cfg.final_logit_softcapping
    m = transformers.Gemma2ForCausalLM(cfg)
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(100)  # logits beyond the cap
    from deltatune.train.loss import _head_of

    assert _head_of(m) is None
    b = collate(ITEMS, 0)
    ours = _loss_and_grads(m, b)
    m.zero_grad(set_to_none=True)
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # the model's own, capped
    assert float(logits.abs().max()) <= 30.0 + 1e-4
    sel = b["labels"][:, 1:] != -100
    ref = nn.functional.cross_entropy(logits[:, :-1][sel].float(), b["labels"][:, 1:][sel], reduction="sum")
    ref.backward()
    assert abs(ours[0] - float(ref)) < 1e-4 * float(ref)
    for k, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[2][k], p.grad, atol=1e-5, rtol=1e-4), k
    # a composite model's text config soft-caps too: the head path steps aside for it as well
    from deltatune.train.loss import soft_caps_logits

    outer = nn.Module()
    outer.config = SimpleNamespace(get_text_config=lambda: cfg)
    assert soft_caps_logits(outer) and not soft_caps_logits(_model("TL"))


def test_explicit_attention_keeps_no_score_tensor_for_backward_under_bf16():
    """Under bf16 autocast the explicit attention's backward keeps no (B, H, Q, K) tensor (it
    computes the probabilities again), and the grouped queries, keys and values once per key head
    (no copy per query head); its gradients equal those of the form that keeps the probabilities."""
    from deltatune.integrations import hf_attention

    m = _adapted("TL")
    cfg = m.config
    assert hf_attention.use_length_aware_attention(m) and cfg.num_attention_heads > cfg.num_key_value_heads
    ids = torch.tensor([[5, 17, 42, 9, 63, 2, 7], [7, 8, 9, 10, 11, 12, 13]])
    B, T, hd = 2, 7, cfg.hidden_size // cfg.num_attention_heads
    scores, per_head = {}, {}

    def keep(t):
        if t.numel() == B * cfg.num_attention_heads * T * T and t.shape[-1] == T:
            scores[t.untyped_storage().data_ptr()] = t.dtype
        if t.dim() >= 3 and t.numel() == B * cfg.num_attention_heads * T * hd and hd in t.shape[-2:] \
                and t.shape[-1] != cfg.hidden_size:  # the queries, or a key or value copied per query head
            per_head[t.untyped_storage().data_ptr()] = t.shape
        return t

    grads = {}
    for recompute in (True, False):
        m.zero_grad(set_to_none=True)
        scores.clear(), per_head.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(hf_attention, "RECOMPUTE", recompute)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
                m(input_ids=ids).logits.float().pow(2).mean().backward()
        grads[recompute] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        if recompute:
            assert not scores, scores
            assert len(per_head) == cfg.num_hidden_layers, per_head  # the queries (keys and values per head: 3 a layer)
        else:
            assert list(scores.values()) == [torch.bfloat16] * cfg.num_hidden_layers, scores
    for k, g in grads[False].items():
        assert (grads[True][k] - g).norm() <= 1e-2 * g.norm() + 1e-8, k


def test_fast_path_settings(monkeypatch):
    from deltatune.train import fastpath

    monkeypatch.setattr(fastpath, "_tuned", None)
    monkeypatch.setenv("DELTATUNE_MALLOC", " System ")
    assert fastpath.malloc_setting() == "system"
    monkeypatch.setenv("DELTATUNE_MALLOC", "off")
    with pytest.raises(ValueError, match="DELTATUNE_MALLOC='off' is not a setting"):
        fastpath.keep_freed_memory()
    assert fastpath._tuned is None  # nothing was set
    monkeypatch.setenv("DELTATUNE_MALLOC", "system")
    assert fastpath.keep_freed_memory() is False
    m = make_tl()
    assert fastpath.prepare_for_training(m, Precision(torch.device("cpu"))) == ["attention", "swiglu", "rmsnorm"]
    assert m.config._attn_implementation == "deltatune"
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        monkeypatch.setattr(fastpath, "_tuned", None)
        monkeypatch.delenv("DELTATUNE_MALLOC")
        assert fastpath.keep_freed_memory() is True
        assert fastpath.prepare_for_training(make_tl(), Precision(torch.device("cpu"))) == ["allocator", "attention",
                                                                                             "swiglu", "rmsnorm"]


def test_fused_swiglu_equals_the_mlp_it_replaces():
    from deltatune.integrations.hf_mlp import swiglu, use_fused_swiglu

    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (g, u))
    ids = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 8, 9, 10, 11, 12]])
    res = {}
    for fused in (False, True):
        m = _adapted("TL")
        if fused:
            assert use_fused_swiglu(m) == m.config.num_hidden_layers and use_fused_swiglu(m) == 0  # once
        for autocast in (False, True):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = m(input_ids=ids).logits.float()
            y.pow(2).mean().backward()
            res[fused, autocast] = (y.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        (y0, g0), (y1, g1) = res[False, autocast], res[True, autocast]
        assert (y1 - y0).norm() <= tol * y0.norm(), autocast
        for k in g0:
            assert (g1[k] - g0[k]).norm() <= 3 * tol * g0[k].norm() + 1e-8, (autocast, k)


@pytest.mark.parametrize("trainable_weight", [False, True])
def test_fused_rmsnorm_equals_the_norm_it_replaces(trainable_weight):
    """The fused norm gives transformers' values and gradients (input, and weight when it trains) in
    fp32, under bf16 autocast (its result then in bf16, the value the next projection casts to),
    and for a bf16 input; inference runs transformers' own forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from deltatune.integrations.hf_norm import rms_norm, use_fused_rmsnorm

    x64 = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w64 = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_(trainable_weight)
    n64 = LlamaRMSNorm(8, eps=1e-5).double()
    n64.weight = nn.Parameter(w64.detach().clone(), requires_grad=trainable_weight)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(n64, x), (x64, n64.weight))
    g = torch.Generator().manual_seed(0)
    for dtype, weight_dtype, autocast in ((torch.float32, torch.float32, False), (torch.float32, torch.bfloat16, True),
                                          (torch.bfloat16, torch.bfloat16, False)):
        res = {}
        x0 = torch.randn(2, 5, 16, generator=g).to(dtype) * 3
        w0 = 1 + 0.1 * torch.randn(16, generator=g)
        dy = torch.randn(2, 5, 16, generator=g)
        for fused in (False, True):
            norm = LlamaRMSNorm(16, eps=1e-6).to(weight_dtype)
            with torch.no_grad():
                norm.weight.copy_(w0)
            norm.weight.requires_grad_(trainable_weight)
            if fused:
                assert use_fused_rmsnorm(nn.Sequential(norm)) == 1 and use_fused_rmsnorm(norm) == 0  # once
            x = x0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = norm(x)
            (y.float() * dy).sum().backward()
            res[fused] = (y, x.grad, norm.weight.grad)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                assert norm(x0).dtype == (torch.float32 if autocast else y.dtype)  # inference: transformers' forward
        (y0, gx0, gw0), (y1, gx1, gw1) = res[False], res[True]
        assert y1.dtype == (torch.bfloat16 if autocast else y0.dtype)
        tol = 1e-5 if dtype is torch.float32 and weight_dtype is torch.float32 else 1e-2
        assert (y1.float() - y0.float()).abs().max() <= tol * y0.float().abs().max(), (dtype, autocast)
        assert (gx1.float() - gx0.float()).norm() <= tol * gx0.float().norm(), (dtype, autocast)
        if trainable_weight:
            assert (gw1.float() - gw0.float()).norm() <= tol * gw0.float().norm(), (dtype, autocast)
        else:
            assert gw0 is None and gw1 is None


def test_recomputed_bf16_attention_equals_the_kept_form_under_every_mask_kind():
    """The bf16 attention that recomputes its probabilities in the backward pass gives the outputs
    and gradients of the form that keeps them, for a padding mask, a packed (block-diagonal) mask,
    fewer queries than keys (a shared prefix's cache), a per-head mask and an additive float mask
    with a fully masked row (float32's lowest value is -inf in bf16: the row must stay finite)."""
    from deltatune.integrations import hf_attention as A

    class M(nn.Module):
        training = True

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, Q, K, hd = 2, 6, 2, 5, 7, 8
    pad = torch.ones(B, 1, Q, K, dtype=torch.bool)
    pad[0, :, :, :3] = False
    block = torch.zeros(B, 1, Q, K, dtype=torch.bool)
    block[:, :, :, :2], block[:, :, 2:, 2:] = True, True
    fl = torch.zeros(B, 1, Q, K)
    fl[1, 0, 0] = torch.finfo(torch.float32).min  # a row with no key
    fl[0, 0, :, 4:] = torch.finfo(torch.float32).min
    masks = {"padding": pad, "packed": block, "causal prefix": None, "per head": torch.rand(B, H, Q, K, generator=g) > .3,
             "float": fl}
    for kind, mask in masks.items():
        ins = [torch.randn(B, H, Q, hd, generator=g), torch.randn(B, Hkv, K, hd, generator=g),
               torch.randn(B, Hkv, K, hd, generator=g)]
        dy = torch.randn(B, Q, H, hd, generator=g)
        res = {}
        for recompute in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(A, "RECOMPUTE", recompute)
                xs = [t.clone().requires_grad_() for t in ins]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y, _ = A._explicit(M(), *xs, mask, 0.0, None, True)
                (y.float() * dy).sum().backward()
                res[recompute] = [y.detach().float()] + [t.grad for t in xs]
        for a, b in zip(res[True], res[False]):
            assert torch.isfinite(a).all(), kind
            assert (a - b).norm() <= 1e-2 * b.norm() + 1e-6, kind
