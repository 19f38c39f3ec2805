"""Regression cases C01, C03, C05, C07, C10, C11, C13 of ../shared/cases/regressions.md, with their
expected values, each generalized to every layer kind it concerns.

Layer kinds: nn.Linear (TL), transformers Conv1D square and non-square (TG), nn.Embedding,
nn.Conv1d and nn.Conv2d (the plain module PM of conftest).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.adapters import get_state
from deltatune.merge import merged_adapters

from conftest import X_IDS, base_tensors, emulate_training, make_pm, make_tg, make_tl, maxdiff, model_folder, run


pytestmark = pytest.mark.usefixtures("one_thread")


MAKERS = {"TL": make_tl, "TG": make_tg, "PM": make_pm}


# ----------------------------------------------------------------------------- C01
C01 = {
    # TG: c_attn is 32->96 (non-square), attn.c_proj 32->32 (square): transformers Conv1D
    "TG-conv1d_hf": ("TG", ["c_attn", "attn.c_proj"]),
    # TL: q_proj square, v_proj 32->16, down_proj 64->32: nn.Linear
    "TL-linear": ("TL", ["q_proj", "v_proj", "down_proj"]),
    # PM: nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear
    "PM-emb-conv-linear": ("PM", ["emb", "conv1", "conv2", "lin"]),
    "TL-embedding": ("TL", ["embed_tokens"]),
}


@pytest.mark.parametrize("case", list(C01))
def test_c01_dora_unmerge_restores_base_on_every_layer_kind(case):
    kind, targets = C01[case]
    model = MAKERS[kind]()
    dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets))
    emulate_training(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    W0 = base_tensors(model)
    with dt.disable_adapter(model), torch.no_grad():
        L0 = run(model, kind)
    with torch.no_grad():
        L1 = run(model, kind)
    assert maxdiff(L1, L0) > 1e-3
    # (1) merge
    dt.merge(model)
    with torch.no_grad():
        assert maxdiff(run(model, kind), L1) < 1e-5
    # (2) disable on a merged model (unmerges inside)
    with dt.disable_adapter(model), torch.no_grad():
        assert maxdiff(run(model, kind), L0) < 1e-5
    assert merged_adapters(model) == ["default"]  # merged again on exit
    # (3) unmerge explicitly: every base weight back (bit for bit here; the case asks < 1e-5)
    dt.unmerge(model)
    for k, v in base_tensors(model).items():
        assert maxdiff(v, W0[k]) < 1e-5, k
        assert torch.equal(v, W0[k]), k
    # (4) merge again
    dt.merge(model)
    with torch.no_grad():
        assert maxdiff(run(model, kind), L1) < 1e-5


# ----------------------------------------------------------------------------- C03
C03 = {
    "TG-conv1d_hf": ("TG", ["c_attn"], ["h.1.mlp.c_proj"]),  # the case itself
    "TL-linear-head": ("TL", ["q_proj"], ["lm_head"]),
    "TL-embedding": ("TL", ["q_proj"], ["embed_tokens"]),
    "TL-container": ("TL", ["q_proj"], ["layers.1.mlp"]),  # a module with children
    "TG-layernorm": ("TG", ["c_attn"], ["ln_f"]),  # not an adaptable layer kind: still copied
    "PM-conv": ("PM", ["lin"], ["conv1", "conv2"]),
}


@pytest.mark.parametrize("case", list(C03))
def test_c03_disable_bypasses_modules_to_save(case):
    kind, targets, mts = C03[case]
    model = MAKERS[kind]()
    with torch.no_grad():
        L0 = run(model, kind)
    originals = {k: v.clone() for k, v in base_tensors(model).items()}
    dt.inject(model, dt.LoraConfig(r=4, target_modules=targets, modules_to_save=mts))
    emulate_training(model)  # changes lora_B and the trainable copies
    with torch.no_grad():
        L1 = run(model, kind)
    assert maxdiff(L1, L0) > 1e-3

    def check():
        with dt.disable_adapter(model), torch.no_grad():
            assert maxdiff(run(model, kind), L0) < 1e-6
        with torch.no_grad():
            assert maxdiff(run(model, kind), L1) < 1e-5

    check()
    dt.merge(model)  # repeat with the adapter merged
    check()
    with pytest.raises(RuntimeError, match="inside"):
        with dt.disable_adapter(model):
            raise RuntimeError("inside")
    with torch.no_grad():
        assert maxdiff(run(model, kind), L1) < 1e-5
    dt.unmerge(model)
    # the original modules' weights were never modified
    for k, v in base_tensors(model).items():
        assert torch.equal(v, originals[k]), k


# ----------------------------------------------------------------------------- C05
def _expected_keys(model, adapter_name):
    """Canonical PEFT keys, computed from the model's modules (independently of the key rule)."""
    keys = set()
    for path, mod in model.named_modules():
        ad = getattr(mod, "_modules", {}).get("adapters")
        if ad is None or adapter_name not in ad._modules or path.endswith("adapters"):
            continue
        a = ad._modules[adapter_name]
        pre = f"base_model.model.{path}."
        if a.side == "replace":  # a modules_to_save copy
            keys |= {pre + k for k in a.state_dict()}
        elif a.kind == "embedding":
            keys |= {pre + "lora_embedding_A", pre + "lora_embedding_B"}
        else:
            keys |= {pre + "lora_A.weight", pre + "lora_B.weight"}
        if getattr(a, "use_dora", False):
            keys.add(pre + "lora_magnitude_vector")
    return keys


C05_MODELS = {
    "TG-default-targets": ("TG", {}),  # the case: default targets (c_attn)
    "TL-linear-embedding-mts-dora": ("TL", {"target_modules": ["embed_tokens", "q_proj", "v_proj"],
                                            "modules_to_save": ["lm_head"], "use_dora": True}),
    "PM-emb-conv-linear": ("PM", {"target_modules": ["emb", "conv1", "conv2", "lin"]}),
}
C05_NAMES = ["lora", "lora_A", "default", "lora_B", "lora_embedding_A", "lora_magnitude_vector", "weight",
             "base_layer", "adapters", "modules_to_save"]


@pytest.mark.parametrize("name", C05_NAMES)
@pytest.mark.parametrize("case", list(C05_MODELS))
def test_c05_adapter_name_never_breaks_keys(case, name, tmp_path):
    kind, extra = C05_MODELS[case]
    model = MAKERS[kind]()
    with torch.no_grad():
        base = run(model, kind)
    dt.inject(model, dt.LoraConfig(r=8, init_lora_weights=False, **extra), adapter_name=name)
    if kind == "TG" and not extra:
        assert dt.get_config(model, name).target_modules == ["c_attn"]
    emulate_training(model)
    with torch.no_grad():
        La = run(model, kind)
    assert maxdiff(La, base) > 1e-3
    dt.save_adapter(model, str(tmp_path / "a"))
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(sd) == _expected_keys(model, name)
    if kind == "TG" and not extra:  # two tensors per adapted module, no adapter name inside
        assert len(sd) == 2 * 2 and all(re.search(r"\.c_attn\.lora_[AB]\.weight$", k) for k in sd)
    fresh = dt.load_adapter(MAKERS[kind](), str(tmp_path / "a"), adapter_name=name)
    with torch.no_grad():
        Lb = run(fresh, kind)
    assert maxdiff(Lb, La) < 1e-6
    assert maxdiff(Lb, base) > 1e-3  # never a "successful" load that is a no-op

    # probe: a hand-edited file whose keys match nothing is an error listing them
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file({k.replace(".lora_", ".lorra_").replace("base_model.model.lm_head.", "base_model.model.lm_hd."): v
               for k, v in sd.items()}, str(bad / "adapter_model.safetensors"))
    target = MAKERS[kind]()
    with pytest.raises(ValueError, match=r"match nothing in the model: .*lorra_"):
        dt.load_adapter(target, str(bad), adapter_name=name)
    assert get_state(target) is None


# ----------------------------------------------------------------------------- C07
def _resize(model, n, seed):
    torch.manual_seed(seed)
    model.resize_token_embeddings(n)
    return model


def _base_folder(tmp_path, make):
    """A base checkpoint on disk (what users load): its config.json names the original vocabulary."""
    d = tmp_path / "base"
    return str(d) if d.exists() else model_folder(d, make())


def _load_base(folder, kind):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _effective(mod):
    """The weight a module computes with: its active modules_to_save copy's, else its own."""
    ads = mod._modules.get("adapters")
    if ads is not None and "default" in ads and ads["default"].side == "replace":
        return ads["default"].weight
    return mod.weight


C07 = {
    "TL-auto": ("TL", {}),  # save_embedding_layers="auto" detects the resize
    "TL-modules_to_save": ("TL", {"modules_to_save": ["embed_tokens", "lm_head"]}),
    "TL-embedding-lora": ("TL", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    "TG-tied-auto": ("TG", {"target_modules": ["c_attn"]}),
}
IDS_NEW = [[5, 128, 17, 129, 130, 131, 2]]


@pytest.mark.parametrize("case", list(C07))
def test_c07_resized_vocabulary(case, tmp_path):
    kind, extra = C07[case]
    folder = _base_folder(tmp_path, MAKERS[kind])
    model = _resize(_load_base(folder, kind), 132, seed=1)
    kw = {"r": 8, "target_modules": ["q_proj", "v_proj"], **extra}
    dt.inject(model, dt.LoraConfig(**kw))
    emulate_training(model)
    with torch.no_grad():
        Le = run(model, kind, IDS_NEW)
    emb = _effective(model.get_input_embeddings()).detach().clone()
    head = _effective(model.get_output_embeddings()).detach().clone()
    dt.save_adapter(model, str(tmp_path / "a"))
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    big = [k for k, v in sd.items() if v.shape[0] == 132]
    assert len(big) >= 2, "the resized embedding and head rows must be saved by default"

    # (a) a base that was not resized: an error before any weight changes, naming both modules and sizes
    plain = _load_base(folder, kind)
    before = base_tensors(plain)
    with pytest.raises(ValueError) as ei:
        dt.load_adapter(plain, str(tmp_path / "a"))
    msg = str(ei.value)
    emb_name, head_name = ("model.embed_tokens", "lm_head") if kind == "TL" else ("transformer.wte", "lm_head")
    for needle in (emb_name, head_name, "128", "132", "resize_token_embeddings(132)"):
        assert needle in msg, (needle, msg)
    assert get_state(plain) is None
    for k, v in base_tensors(plain).items():
        assert torch.equal(v, before[k]), k

    # (b) a base resized to 132 beforehand (other random rows): rows bit-equal, logits match
    other = _resize(_load_base(folder, kind), 132, seed=2)
    assert not torch.equal(other.get_input_embeddings().weight[128:], emb[128:])
    dt.load_adapter(other, str(tmp_path / "a"))
    assert torch.equal(_effective(other.get_input_embeddings())[128:132], emb[128:132])
    assert torch.equal(_effective(other.get_output_embeddings())[128:132], head[128:132])
    with torch.no_grad():
        assert maxdiff(run(other, kind, IDS_NEW), Le) < 1e-5
    # saved again by default, as the file carried them
    dt.save_adapter(other, str(tmp_path / "again"))
    assert set(load_file(str(tmp_path / "again" / "adapter_model.safetensors"))) == set(sd)


def test_c07_resize_after_inject_is_saved_and_unresized_not(tmp_path):
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    dt.save_adapter(model, str(tmp_path / "plain"))
    assert len(load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))) == 2 * 2 * 2  # LoRA only
    _resize(model, 132, seed=1)
    dt.save_adapter(model, str(tmp_path / "resized"))
    sd = load_file(str(tmp_path / "resized" / "adapter_model.safetensors"))
    assert sd["base_model.model.model.embed_tokens.weight"].shape == (132, 32)
    assert sd["base_model.model.lm_head.weight"].shape == (132, 32)
    dt.save_adapter(model, str(tmp_path / "off"), save_embedding_layers=False)
    assert len(load_file(str(tmp_path / "off" / "adapter_model.safetensors"))) == 8


# ----------------------------------------------------------------------------- C11
C11 = {
    "TL-linear": ("TL", "all-linear", False, 14),  # 2 layers x q,k,v,o,gate,up,down
    "TG-conv1d_hf": ("TG", "all-linear", False, 8),  # 2 layers x c_attn, attn.c_proj, c_fc, mlp.c_proj
    "PM-conv-linear": ("PM", ["conv1", "conv2", "lin"], False, 3),
    "TL-dora": ("TL", "all-linear", True, 14),
    "PM-conv-dora": ("PM", ["conv1", "conv2", "lin"], True, 3),
}


@pytest.mark.parametrize("case", list(C11))
def test_c11_dropout_reaches_every_layer(case):
    kind, targets, dora, n_layers = C11[case]
    # GPT-2's own dropouts off, so that "equals the base model in train mode" is checkable
    model = make_tg(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if kind == "TG" else MAKERS[kind]()
    with torch.no_grad():
        base_eval = run(model, kind)
    dt.inject(model, dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.5, init_lora_weights=False,
                                   target_modules=targets, use_dora=dora))
    if dora:
        emulate_training(model)  # magnitude != norm, so the DoRA path matters
    ads = [m for m in model.modules() if isinstance(m, dt.methods.lora.LoraAdapter)]
    # (1) every LoRA layer has p = 0.5
    assert len(ads) == n_layers
    assert all(isinstance(a.lora_dropout, torch.nn.Dropout) and a.lora_dropout.p == 0.5 for a in ads)
    # (2) train mode, two seeds: different
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        t1 = run(model, kind)
        torch.manual_seed(2)
        t2 = run(model, kind)
    assert maxdiff(t1, t2) > 1e-6
    # (3) eval mode: identical
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, kind), run(model, kind))
    # (4) p = 1.0 in train mode: the base output
    for a in ads:
        a.lora_dropout.p = 1.0
    model.train()
    with torch.no_grad():
        with dt.disable_adapter(model):
            base_train = run(model, kind)
        assert maxdiff(run(model, kind), base_train) < 1e-6
    assert maxdiff(base_train, base_eval) < 1e-6  # (these tiny models have no other dropout)
    for a in ads:
        a.lora_dropout.p = 0.5
    # (5) merge in train mode twice from the same state: bit-equal, no dropout mask baked in
    dt.merge(model)
    m1 = base_tensors(model)
    dt.unmerge(model)
    torch.manual_seed(123)
    dt.merge(model)
    m2 = base_tensors(model)
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
    model.eval()
    with torch.no_grad():
        merged_eval = run(model, kind)
    dt.unmerge(model)
    with torch.no_grad():
        assert maxdiff(merged_eval, run(model, kind)) <= 1e-5 * run(model, kind).abs().max().item()


# ----------------------------------------------------------------------------- C13
C13 = {
    "TL-lora": ("TL", {"target_modules": ["q_proj", "v_proj"]}),
    "TL-dora": ("TL", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
    "TG-lora-conv1d_hf": ("TG", {"target_modules": ["c_attn", "c_proj"]}),
    "TG-dora-conv1d_hf": ("TG", {"target_modules": ["c_attn", "c_proj"], "use_dora": True}),
    "PM-lora-emb-conv": ("PM", {"target_modules": ["emb", "conv1", "conv2", "lin"]}),
    "PM-dora-emb-conv": ("PM", {"target_modules": ["emb", "conv1", "conv2", "lin"], "use_dora": True}),
}


def _loss(model, kind):
    if kind == "PM":
        return run(model, kind).float().pow(2).mean()
    ids = torch.tensor(X_IDS)
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("adapter_dtype", [None, "base"], ids=["fp32-adapter", "bf16-adapter"])
@pytest.mark.parametrize("case", list(C13))
def test_c13_bf16_base_keeps_dtype(case, adapter_dtype, tmp_path):
    kind, kw = C13[case]
    model = MAKERS[kind]().to(torch.bfloat16)
    dt.inject(model, dt.LoraConfig(r=8, lora_alpha=16, **kw), adapter_dtype=adapter_dtype)
    # the documented rule: float32 adapters by default (inputs cast at the boundary), "base" follows the base
    want = torch.float32 if adapter_dtype is None else torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {want}
    model.train()
    out = run(model, kind)
    assert out.dtype == torch.bfloat16
    _loss(model, kind).backward()
    grads = [p.grad for n, p in model.named_parameters() if ".adapters." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()
    emulate_training(model, std=0.05)
    with torch.no_grad():
        unmerged = run(model, kind)
    dt.merge_and_unload(model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, n
    with torch.no_grad():
        merged = run(model, kind)
    assert merged.dtype == torch.bfloat16
    assert maxdiff(merged, unmerged) < 2e-2
    # the saved merged checkpoint has a plain bf16 model's per-tensor dtypes and size (+-1%)
    plain = MAKERS[kind]().to(torch.bfloat16)
    if kind == "PM":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "p.safetensors"))
        fm, fp = tmp_path / "m.safetensors", tmp_path / "p.safetensors"
    else:
        model.save_pretrained(str(tmp_path / "m"))
        plain.save_pretrained(str(tmp_path / "p"))
        fm, fp = tmp_path / "m" / "model.safetensors", tmp_path / "p" / "model.safetensors"
    sm, sp = load_file(str(fm)), load_file(str(fp))
    assert {k: v.dtype for k, v in sm.items()} == {k: v.dtype for k, v in sp.items()}
    assert abs(os.path.getsize(fm) - os.path.getsize(fp)) <= 0.01 * os.path.getsize(fp)


# ----------------------------------------------------------------------------- C10
C10_METHODS = {
    "lora": lambda: dt.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  init_lora_weights=False),
    "dora": lambda: dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True,
                                  init_lora_weights=False),
    "ia3": lambda: dt.IA3Config(),
    "bottleneck": lambda: dt.BottleneckConfig(style="pfeiffer", reduction_factor=4),
}


def _enable_checkpointing(model):
    """Reentrant checkpointing WITHOUT transformers' embedding-output hook: transformers >= 5 adds
    ``enable_input_require_grads`` itself, older releases and trainer code paths did not (the fault
    of C10), so the hook is taken off again and deltatune must stand on its own."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    emb = model.get_input_embeddings()
    assert not emb._forward_hooks or get_state(model) is not None  # only deltatune's hook may remain


def _c10_grads(method, order, checkpointing, kind="TL"):
    """Adapter gradients of a causal-LM loss on X with the base frozen; checkpointing (reentrant)
    enabled before or after injection, or not at all."""
    model = MAKERS[kind]()
    model.train()
    if checkpointing and order == "before":
        _enable_checkpointing(model)
    torch.manual_seed(0)
    dt.inject(model, C10_METHODS[method]())
    with torch.no_grad():  # emulate training so that every adapter tensor gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    if checkpointing and order == "after":
        _enable_checkpointing(model)
    x = torch.tensor(X_IDS)
    loss = model(input_ids=x, labels=x).loss
    assert loss.grad_fn is not None  # the failure mode: "element 0 of tensors does not require grad"
    loss.backward()
    base = {n: p.grad for n, p in model.named_parameters() if ".adapters." not in f".{n}"}
    assert all(g is None for g in base.values()), [n for n, g in base.items() if g is not None]
    assert not model.get_input_embeddings().weight.requires_grad  # checkpointing made nothing trainable
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    dt.delete_adapter(model, "default")
    assert not model.get_input_embeddings()._forward_hooks  # the hook goes with the last adapter
    return grads


@pytest.mark.parametrize("kind", ["TL", "TG"])
@pytest.mark.parametrize("method", list(C10_METHODS))
@pytest.mark.parametrize("order", ["before", "after"])
def test_c10_gradient_checkpointing_with_frozen_base_gives_adapter_gradients(method, order, kind):
    if kind == "TG" and method in ("lora", "dora"):
        C10_METHODS[f"{method}-tg"] = lambda m=method: dt.LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn"], use_dora=(m == "dora"), init_lora_weights=False)
        method = f"{method}-tg"
    ref = _c10_grads(method, order, checkpointing=False, kind=kind)
    got = _c10_grads(method, order, checkpointing=True, kind=kind)
    assert set(got) == set(ref) and got
    for n, g in got.items():
        assert g is not None, n
        assert maxdiff(g, ref[n]) < 1e-5, n
    lora_b = [g for n, g in got.items() if "lora_B" in n]
    assert all(float(g.norm()) > 0 for g in lora_b)
    assert float(sum(g.norm() for g in got.values())) > 0


def test_loading_into_an_existing_adapter_of_another_config_is_an_error(tmp_path):
    """The file's weights would run under the model's config (alpha 8 instead of 64): refused."""
    src = make_tl()
    dt.inject(src, dt.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj"], init_lora_weights=False))
    dt.save_adapter(src, str(tmp_path / "a64"))
    dst = make_tl()
    dt.inject(dst, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in dt.adapter_state_dict(dst).items()}
    with pytest.raises(ValueError, match="lora_alpha: 8 here, 64 in the file"):
        dt.load_adapter(dst, str(tmp_path / "a64"))
    assert all(torch.equal(v, before[k]) for k, v in dt.adapter_state_dict(dst).items())  # nothing loaded
    # the same config (dropout and init differ: they do not change what is computed) loads
    same = make_tl()
    dt.inject(same, dt.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj"], lora_dropout=0.1))
    dt.load_adapter(same, str(tmp_path / "a64"))
    assert maxdiff(run(same, "TL"), run(src, "TL")) < 1e-6


def test_set_adapter_refuses_a_name_twice():
    m = make_tl()
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj"]), "l")
    with pytest.raises(ValueError, match="twice"):
        dt.set_adapter(m, ["l", "l"])
    assert dt.active_adapters(m) == ["l"]
