"""Combining LoRA adapters (``deltatune.add_weighted_adapter``) against the real ``peft``.

The same source adapters (saved by deltatune, loaded into ``peft.PeftModel``) are combined by both
libraries; per adapted layer the products ``s * B A`` of the two results agree within 1e-5 (fp32,
relative to the largest entry), for ``linear``, ``cat``, ``svd``, ``ties``, ``magnitude_prune`` and
the svd variants, with negative weights and mixed ranks, on nn.Linear (tiny Llama), transformers
Conv1D (tiny GPT-2) and embeddings. DARE is compared on its deterministic part (density 1) with
peft, and under one seed with peft's own task-vector functions. One adapter at weight 1 by ``cat``
or ``linear`` is the adapter itself (rsLoRA too), the result saves, loads and runs like any
adapter, and what cannot be combined exactly is refused.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

import deltatune as dt
from deltatune.combine import merge_task_tensors

from conftest import X_IDS, make_pm, make_tg, make_tl, maxdiff

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sources(kind, specs):
    """A tiny model with LoRA adapters name -> LoraConfig kwargs (random A and B)."""
    model = {"TL": make_tl, "TG": make_tg}[kind]()
    g = torch.Generator().manual_seed(7)
    for name, kw in specs.items():
        dt.inject(model, dt.LoraConfig(init_lora_weights=False, **kw), name)
        with torch.no_grad():
            for p in dt.get_record(model, name).parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def products(model, name):
    """host path -> s * B A (float32, canonical layout) of one adapter."""
    out = {}
    for path in dt.get_record(model, name).hosts:
        host = model.get_submodule(path)
        out[path] = host.adapters[name].delta_weight(host).detach()
    return out


def peft_products(pm, name):
    """host path -> s * B A of a peft adapter (same layout as ours)."""
    out = {}
    for path, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and (name in mod.lora_A or name in getattr(mod, "lora_embedding_A", {})):
            if name in mod.lora_A:
                a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
                d = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(b.shape[0], *a.shape[1:])
            else:
                d = mod.lora_embedding_B[name] @ mod.lora_embedding_A[name]
            out[path] = (d * mod.scaling[name]).detach().float()
    return out


def to_peft(model, names, tmp_path, kind):
    base = {"TL": make_tl, "TG": make_tg}[kind]()
    pm = None
    for n in names:
        d = tmp_path / n
        dt.save_adapter(model, str(d), adapter_name=n)
        pm = PeftModel.from_pretrained(base, str(d), adapter_name=n) if pm is None else pm
        if n not in pm.peft_config:
            pm.load_adapter(str(d), adapter_name=n)
    return pm


def rel(a, b):
    return maxdiff(a, b) / max(b.abs().max().item(), 1e-12)


SPECS = {
    "TL": {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
           "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"]),
           "c": dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True),
           "d": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])},
    "TG": {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
           "b": dict(r=4, lora_alpha=16, target_modules=["c_attn", "wte"]),
           "c": dict(r=6, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_rslora=True),
           "d": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"])},
}
CASES = [
    ("linear", ["a", "b"], [1.5, -0.7], {}),
    ("linear", ["a", "d"], [0.3, 0.9], {}),
    ("cat", ["a", "c"], [1.0, -0.5], {}),
    ("cat", ["a", "b", "c"], [0.6, 0.8, -1.2], {}),
    ("svd", ["a", "c"], [1.0, -0.5], {}),
    ("svd", ["a", "b", "c"], [0.6, 0.8, -1.2], {"svd_rank": 3}),
    ("ties", ["a", "b", "d"], [1.0, -0.6, 0.8], {"density": 0.5}),
    ("ties", ["a", "d"], [0.7, 0.7], {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["a", "b"], [1.2, -0.4], {"density": 0.6}),
    ("ties_svd", ["a", "c"], [1.0, 0.5], {"density": 0.5}),
    ("magnitude_prune_svd", ["a", "c"], [1.0, -0.5], {"density": 0.4, "svd_rank": 2}),
    ("dare_linear", ["a", "b"], [1.0, -0.5], {"density": 1.0}),  # DARE's deterministic part
    ("dare_ties", ["a", "d"], [1.0, 0.5], {"density": 1.0}),
    ("dare_linear_svd", ["a", "c"], [1.0, -0.5], {"density": 1.0}),
    ("dare_ties_svd", ["a", "c"], [1.0, -0.5], {"density": 1.0}),
]


@pytest.mark.parametrize("kind", ["TL", "TG"])
@pytest.mark.parametrize("ctype,names,weights,kw", CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in CASES])
def test_combination_equals_peft(kind, ctype, names, weights, kw, tmp_path):
    model = sources(kind, SPECS[kind])
    pm = to_peft(model, names, tmp_path, kind)
    pm.add_weighted_adapter(names, weights, "mix", combination_type=ctype, **kw)
    dt.add_weighted_adapter(model, names, weights, "mix", combination_type=ctype, **kw)
    ours, theirs = products(model, "mix"), peft_products(pm, "mix")
    assert set(ours) == set(theirs) and ours
    worst = max(rel(ours[p], theirs[p]) for p in ours)
    assert worst <= TOL, worst
    cfg = dt.get_config(model, "mix")
    assert not cfg.use_rslora and all(model.get_submodule(p).adapters["mix"].scaling == 1.0 for p in ours)


def test_dare_draws_masks_like_peft_under_one_seed():
    """Our task-vector rules equal peft's merge_utils on the same tensors; DARE's masks under one seed."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(6, 5, generator=g) for _ in range(3)]
    w = torch.tensor([0.7, -1.1, 0.4])
    for rule, fn, extra in (("dare_linear", merge_utils.dare_linear, ()),
                            ("dare_ties", merge_utils.dare_ties, ("total",)),
                            ("ties", merge_utils.ties, ("frequency",)),
                            ("magnitude_prune", merge_utils.magnitude_prune, ())):
        torch.manual_seed(11)
        theirs = fn(ts, w, 0.4, *extra)
        torch.manual_seed(11)
        ours = merge_task_tensors(rule, ts, w.tolist(), 0.4, *(extra or ("total",)))
        assert maxdiff(ours, theirs) <= 1e-6, rule
        assert (ours == 0).any(), rule  # something was dropped: the comparison can fail


def test_dare_generator_makes_the_combination_repeatable():
    model = sources("TL", SPECS["TL"])
    for name in ("x", "y"):
        dt.add_weighted_adapter(model, ["a", "d"], [1.0, 1.0], name, "dare_linear", density=0.5,
                                generator=torch.Generator().manual_seed(3))
    x, y = products(model, "x"), products(model, "y")
    assert all(torch.equal(x[p], y[p]) for p in x)
    lin = sources("TL", SPECS["TL"])
    dt.add_weighted_adapter(lin, ["a", "d"], [1.0, 1.0], "lin", "linear")
    assert max(maxdiff(x[p], products(lin, "lin")[p]) for p in x) > 1e-3  # DARE dropped something


@pytest.mark.parametrize("kind", ["TL", "TG"])
@pytest.mark.parametrize("ctype", ["cat", "linear", "svd"])
@pytest.mark.parametrize("src", ["a", "c"])  # c is rsLoRA
def test_one_adapter_at_weight_one_gives_it_back(kind, ctype, src):
    model = sources(kind, SPECS[kind])
    dt.add_weighted_adapter(model, [src], [1.0], "same", combination_type=ctype)
    assert max(rel(products(model, "same")[p], products(model, src)[p]) for p in products(model, src)) <= 1e-6
    ids = torch.tensor(X_IDS)
    with torch.no_grad():
        dt.set_adapter(model, src)
        want = model(ids).logits
        dt.set_adapter(model, "same")
        got = model(ids).logits
    assert maxdiff(got, want) <= TOL


def test_lora_bias_is_combined_exactly_or_refused():
    model = sources("TG", {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True),
                           "b": dict(r=2, lora_alpha=2, target_modules=["c_attn"], lora_bias=True)})
    ids = torch.tensor(X_IDS)
    with torch.no_grad():
        dt.set_adapter(model, "a")
        want = model(ids).logits
        for ctype in ("cat", "linear"):
            dt.add_weighted_adapter(model, ["a"], [1.0], f"one_{ctype}", combination_type=ctype)
            dt.set_adapter(model, f"one_{ctype}")
            assert maxdiff(model(ids).logits, want) <= TOL, ctype
        # cat of two is their weighted sum exactly: merged weights and biases equal merging both sources
        dt.add_weighted_adapter(model, ["a", "b"], [0.5, -1.5], "two", combination_type="cat")
        dt.set_adapter(model, "two")
        got = model(ids).logits
    for ctype in ("ties", "dare_linear", "magnitude_prune_svd"):
        with pytest.raises(ValueError, match=f"not supported for lora_bias adapters with combination_type='{ctype}'"):
            dt.add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "no", combination_type=ctype, density=0.5)
    ref = sources("TG", {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True),
                         "b": dict(r=2, lora_alpha=2, target_modules=["c_attn"], lora_bias=True)})
    with torch.no_grad():
        for n, w in (("a", 0.5), ("b", -1.5)):
            for path in dt.get_record(ref, n).hosts:
                ad = ref.get_submodule(path).adapters[n]
                ad.lora_B.weight.mul_(w)
                ad.lora_B.bias.mul_(w)
        dt.set_adapter(ref, ["a", "b"])
        assert maxdiff(got, ref(ids).logits) <= TOL


def test_refused_sources_name_the_adapter_and_the_reason():
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), "plain")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), "copies")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["v_proj"], bias="lora_only"), "biased")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights="pissa"), "pissa")
    dt.inject(model, dt.IA3Config(), "ia3")
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), "r4")
    before = dt.adapter_names(model)
    for src, msg in (("dora", "not supported for DoRA adapters"), ("copies", "modules_to_save"),
                     ("biased", "train base biases"), ("pissa", "PiSSA/OLoRA"), ("ia3", "not supported for 'ia3'")):
        with pytest.raises(ValueError, match=msg):
            dt.add_weighted_adapter(model, ["plain", src], [1.0, 1.0], "new", "cat")
    with pytest.raises(ValueError, match="one rank per layer"):
        dt.add_weighted_adapter(model, ["plain", "r4"], [1.0, 1.0], "new", "linear")
    with pytest.raises(ValueError, match="needs density"):
        dt.add_weighted_adapter(model, ["plain", "r4"], [1.0, 1.0], "new", "ties_svd")
    with pytest.raises(ValueError, match="already has an adapter named 'plain'"):
        dt.add_weighted_adapter(model, ["r4"], [1.0], "plain", "cat")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        dt.add_weighted_adapter(model, ["plain", "nope"], [1.0, 1.0], "new", "cat")
    with pytest.raises(ValueError, match="one weight per adapter"):
        dt.add_weighted_adapter(model, ["plain", "r4"], [1.0], "new", "cat")
    with pytest.raises(ValueError, match="combination_type='avg'"):
        dt.add_weighted_adapter(model, ["plain", "r4"], [1.0, 1.0], "new", "avg")
    assert dt.adapter_names(model) == before


def test_combined_adapter_saves_loads_and_its_config_does_not_rescale(tmp_path):
    model = sources("TL", SPECS["TL"])
    dt.add_weighted_adapter(model, ["a", "b", "c"], [0.6, 0.8, -1.2], "mix", "cat")
    dt.set_adapter(model, "mix")
    ids = torch.tensor(X_IDS)
    with torch.no_grad():
        want = model(ids).logits
    dt.save_adapter(model, str(tmp_path / "mix"), adapter_name="mix")
    cfg = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"] == 16
    assert all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())
    fresh = make_tl()
    dt.load_adapter(fresh, str(tmp_path / "mix"))
    pm = PeftModel.from_pretrained(make_tl(), str(tmp_path / "mix"))
    with torch.no_grad():
        assert maxdiff(fresh(ids).logits, want) <= TOL
        assert maxdiff(pm(ids).logits, want) <= TOL
    # cat is the weighted sum of the updates, exactly: merging it equals merging the weighted sources
    with torch.no_grad():
        merged = dt.merge_and_unload(model, ["mix"])(ids).logits
    assert maxdiff(merged, want) <= TOL


def test_convolutions_combine_by_every_rule():
    model = make_pm()
    for n, r in (("a", 2), ("b", 2), ("c", 3)):
        dt.inject(model, dt.LoraConfig(r=r, target_modules=["emb", "conv1", "conv2", "lin"], init_lora_weights=False), n)
    ids = torch.tensor([[1, 5, 9, 33, 2, 17]])
    with torch.no_grad():
        dt.set_adapter(model, ["a", "c"])
        want = model(ids)  # a + c stacked = their sum
        dt.add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], "cat", "cat")
        dt.add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], "svd", "svd", svd_rank=5)
        for n in ("cat", "svd"):
            dt.set_adapter(model, n)
            assert maxdiff(model(ids), want) <= TOL, n
        dt.add_weighted_adapter(model, ["a", "b"], [1.0, -1.0], "ties", "ties", density=0.5)
        dt.set_adapter(model, "ties")
        assert torch.isfinite(model(ids)).all()
