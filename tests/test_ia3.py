"""(IA)3 beyond the invariant matrix (test_matrix.py): PEFT interop both ways, closed-form parameter counts,
the scaling maths, file keys, several adapters, config validation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import emulate_training, make_tg, make_tl
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.methods.ia3 import IA3Adapter, IA3Config

pytestmark = pytest.mark.usefixtures("one_thread")

# TL: hidden 32, 4 heads -> head_dim 8, 2 kv heads -> k/v out 16, intermediate 64, 2 layers.
# TG: n_embd 32, c_attn 32 -> 96, mlp.c_proj 128 -> 32, 2 layers.
TL_DEFAULT_COUNT = 2 * (16 + 16 + 64)  # k_proj out + v_proj out + down_proj in, per layer
TG_DEFAULT_COUNT = 2 * (96 + 128)  # c_attn out + mlp.c_proj in, per layer


def _trained(make, cfg, std=0.3):
    m = make()
    dt.inject(m, cfg())
    emulate_training(m, std=std)
    return m


def test_parameter_counts_closed_form(tl, tg):
    dt.inject(tl, IA3Config())
    assert dt.count_parameters(tl)[0] == TL_DEFAULT_COUNT == 192
    dt.inject(tg, IA3Config())
    assert dt.count_parameters(tg)[0] == TG_DEFAULT_COUNT == 448
    # all-linear on TL (feed-forward: down_proj): q 32 + k 16 + v 16 + o 32 + gate 64 + up 64 + down(in) 64
    m = make_tl()
    dt.inject(m, IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]))
    assert dt.count_parameters(m)[0] == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 64)
    # and the same count as Hugging Face PEFT
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    pm = get_peft_model(make_tl(), PeftIA3Config(task_type="CAUSAL_LM"))
    assert pm.get_nb_trainable_parameters()[0] == TL_DEFAULT_COUNT


def test_feedforward_scales_input_other_scales_output():
    torch.manual_seed(0)
    lin_out, lin_in = nn.Linear(6, 4), nn.Linear(6, 4)
    model = nn.ModuleDict({"a": lin_out, "b": lin_in})
    dt.inject(model, IA3Config(target_modules=["a", "b"], feedforward_modules=["b"]))
    la, lb = lin_out.adapters.default.ia3_l, lin_in.adapters.default.ia3_l
    assert la.shape == (4, 1) and lb.shape == (1, 6)  # PEFT's shapes
    with torch.no_grad():
        la.copy_(torch.arange(1.0, 5.0).view(4, 1))
        lb.copy_(torch.arange(1.0, 7.0).view(1, 6) / 3)
    x = torch.randn(3, 6)
    W, b = lin_out.weight, lin_out.bias
    assert torch.allclose(lin_out(x), (x @ W.T + b) * la.view(-1), atol=1e-6)
    W, b = lin_in.weight, lin_in.bias
    assert torch.allclose(lin_in(x), (x * lb.view(-1)) @ W.T + b, atol=1e-6)


def test_save_load_round_trip_and_keys(tmp_path, X):
    m = _trained(make_tl, IA3Config)
    L1 = m(X).logits
    dt.save_adapter(m, str(tmp_path))
    keys = sorted(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    assert "base_model.model.model.layers.1.self_attn.k_proj.ia3_l" in keys and len(keys) == 6
    cfg = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert "layers_to_transform" not in cfg  # a field PEFT's IA3Config lacks is left out when unused

    m2 = make_tl()
    dt.load_adapter(m2, str(tmp_path))
    assert torch.equal(m2(X).logits, L1)
    assert not any(p.requires_grad for p in m2.parameters())  # inference by default
    m3 = make_tl()
    dt.load_adapter(m3, str(tmp_path), is_trainable=True)
    assert all(n.endswith("ia3_l") for n, p in m3.named_parameters() if p.requires_grad)


def test_load_no_match_and_wrong_shape_are_errors(tmp_path, X):
    m = _trained(make_tl, IA3Config)
    dt.save_adapter(m, str(tmp_path))
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    t = load_file(path)
    # no key matches
    bad = tmp_path / "nomatch"
    bad.mkdir()
    save_file({k.replace("layers", "blocks"): v for k, v in t.items()}, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(open(os.path.join(tmp_path, "adapter_config.json")).read())
    fresh = make_tl()
    base = fresh(X).logits
    with pytest.raises(ValueError, match="match nothing"):
        dt.load_adapter(fresh, str(bad))
    assert dt.adapter_names(fresh) == [] and torch.equal(fresh(X).logits, base)
    # wrong shape
    bad2 = tmp_path / "shape"
    bad2.mkdir()
    t2 = dict(t)
    k = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    t2[k] = torch.ones(8, 1)
    save_file(t2, str(bad2 / "adapter_model.safetensors"))
    (bad2 / "adapter_config.json").write_text(open(os.path.join(tmp_path, "adapter_config.json")).read())
    with pytest.raises(ValueError, match="shape mismatch"):
        dt.load_adapter(make_tl(), str(bad2))


@pytest.mark.parametrize("make", [make_tl, make_tg], ids=["TL", "TG"])
def test_peft_round_trip_both_ways(make, tmp_path, X):
    from peft import IA3Config as PeftIA3Config
    from peft import PeftModel, get_peft_model

    # deltatune -> peft
    m = _trained(make, IA3Config)
    L1 = m(X).logits
    dt.save_adapter(m, str(tmp_path / "ours"))
    pm = PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    assert (pm(input_ids=X).logits - L1).abs().max() < 1e-5
    # peft -> deltatune
    pm = get_peft_model(make(), PeftIA3Config(task_type="CAUSAL_LM"))
    emulate_training(pm, std=0.3)
    Lp = pm(input_ids=X).logits
    assert (Lp - make()(X).logits).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path / "theirs"))
    m2 = make()
    dt.load_adapter(m2, str(tmp_path / "theirs"))
    assert (m2(X).logits - Lp).abs().max() < 1e-5
    # merged on both sides agrees too
    dt.merge(m2)
    assert (m2(X).logits - pm.merge_and_unload()(input_ids=X).logits).abs().max() < 1e-5


def test_merge_and_unload_gives_plain_model(X):
    m = _trained(make_tg, IA3Config)
    L1 = m(X).logits
    out = dt.merge_and_unload(m)
    assert out is m and dt.adapter_names(m) == []
    assert not any(".adapters." in n for n, _ in m.named_parameters())
    assert all(not h for h in (mod._forward_pre_hooks for mod in m.modules()))
    assert (m(X).logits - L1).abs().max() <= 1e-5 * L1.abs().max()


def test_several_adapters_multiply_and_unmerge_exactly(X):
    m = make_tg()
    base = m(X).logits
    W0 = {k: v.clone() for k, v in m.state_dict().items()}
    for i, name in enumerate(["a", "b", "c"]):
        dt.inject(m, IA3Config(), name)
        dt.set_adapter(m, name)
        emulate_training(m, std=0.2, seed=10 + i)
    dt.set_adapter(m, ["a", "b", "c"])
    L = m(X).logits
    assert (L - base).abs().max() > 1e-3
    dt.merge(m)
    assert (m(X).logits - L).abs().max() <= 1e-5 * L.abs().max()
    dt.unmerge(m, adapter_names=["a"])  # b and c are merged again on top of the original
    assert (m(X).logits - L).abs().max() <= 1e-5 * L.abs().max()
    dt.unmerge(m)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in W0.items())
    dt.delete_adapter(m, "a")
    dt.delete_adapter(m, "b")
    dt.delete_adapter(m, "c")
    assert torch.equal(m(X).logits, base)
    assert all(not mod._forward_pre_hooks for mod in m.modules())  # the input-scaling hooks are gone


def test_modules_to_save_and_disable(X):
    cfg = IA3Config(modules_to_save=["lm_head"])
    m = make_tl()
    base = m(X).logits
    dt.inject(m, cfg)
    emulate_training(m, std=0.3)
    assert (m(X).logits - base).abs().max() > 1e-3
    with dt.disable_adapter(m):
        assert torch.equal(m(X).logits, base)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert "lm_head.adapters.default.weight" in names


def test_config_validation_and_errors():
    with pytest.raises(ValueError, match="subset"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="feedforward_modules"):
        dt.inject(nn.Sequential(nn.Linear(4, 4)), IA3Config(target_modules=["0"]))
    with pytest.raises(TypeError, match="Embedding"):
        dt.inject(make_tl(), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="matched no"):
        dt.inject(make_tl(), IA3Config(target_modules=["nope"], feedforward_modules=[]))
    c = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert dt.config_from_dict(c.to_dict()) == c
    # PEFT's rule: a feed-forward list entry must END the name (no dot boundary)
    from deltatune.methods.ia3 import is_feedforward

    assert is_feedforward(c, "model.layers.0.mlp.down_proj")
    assert not is_feedforward(c, "model.layers.0.mlp.down_proj.x")
    assert is_feedforward(IA3Config(target_modules=".*proj", feedforward_modules=r".*\.down_proj"), "a.down_proj")


def test_bf16_base_keeps_dtype(X):
    m = make_tl().to(torch.bfloat16)
    dt.inject(m, IA3Config())
    m.train()
    out = m(X, labels=X)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    m.eval()
    dt.merge_and_unload(m)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_extra_repr_for_inspect():
    m = make_tl()
    dt.inject(m, IA3Config())
    r = repr(m.model.layers[0].mlp.down_proj.adapters.default)
    assert "scales=input (feed-forward)" in r and "size=64" in r
    assert isinstance(m.model.layers[0].self_attn.k_proj.adapters.default, IA3Adapter)
