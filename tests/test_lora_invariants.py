"""The invariant matrix of DESIGN.md for LoRA / rsLoRA / DoRA, over every config variant of issue 2.

Models: TL (tiny Llama, nn.Linear), TG (tiny GPT-2, transformers Conv1D, tied lm_head) and PM, a
plain nn.Module with nn.Embedding, nn.Conv1d, nn.Conv2d and nn.Linear (all with biases).

Invariants checked for every (model, variant):
  * inject returns the same object; base parameter names unchanged; a base state_dict still loads;
  * a fresh adapter with an identity init computes the base output (rel 1e-5);
  * after "training" (noise on trainable tensors) the output moves (so the checks below can fail);
  * disabled adapter == base output exactly, incl. modules_to_save copies and trained biases;
  * merged == unmerged (fp32, rel <= 1e-5); unmerge restores every base tensor bit for bit;
  * only adapter tensors (+ modules_to_save copies, trained biases) require grad, and all get grads;
  * save -> load into a fresh model gives identical outputs; a file with no matching keys or a
    wrong shape is an error naming the keys; deleting the adapter gives back the base model.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.adapters import _input_hook, _output_hook, get_state
from deltatune.merge import merged_adapters

from conftest import X_IDS, emulate_training, make_tg, make_tl


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread. On a busy 2-core machine a second OpenMP thread makes every tiny op
    wait for a descheduled worker (~30 ms instead of ~3 us)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- models
class Plain(nn.Module):
    """ids (B, T) -> Embedding -> Conv1d -> Conv2d -> Linear -> classifier; every layer has a bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv1 = nn.Conv1d(12, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.lin = nn.Linear(4 * 4 * 6, 16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)  # (B, 12, T)
        h = torch.tanh(self.conv1(h))  # (B, 8, T)
        h = h.reshape(h.shape[0], 2, 4, h.shape[-1])  # (B, 2, 4, T)
        h = torch.tanh(self.conv2(h))  # (B, 4, 4, T)
        h = torch.tanh(self.lin(h.flatten(1)))  # (B, 16)
        return self.classifier(h)  # (B, 5)


def make_pm(seed: int = 0):
    torch.manual_seed(seed)
    return Plain().eval()


MAKERS = {"TL": make_tl, "TG": make_tg, "PM": make_pm}
PM_IDS = [[1, 5, 9, 33, 2, 17], [4, 4, 0, 39, 12, 8]]


def run(model, kind):
    if kind == "PM":
        return model(torch.tensor(PM_IDS))
    return model(input_ids=torch.tensor(X_IDS)).logits


TARGETS = {
    "TL": ["q_proj", "v_proj", "down_proj"],
    "TG": ["c_attn", "c_proj", "c_fc"],
    "PM": ["emb", "conv1", "conv2", "lin"],
}

# variant -> (model kind -> LoraConfig kwargs, or None when the variant does not apply)
V = {
    "plain": lambda k: {},
    "rslora": lambda k: {"use_rslora": True},
    "dora": lambda k: {"use_dora": True},
    "dora_dropout": lambda k: {"use_dora": True, "lora_dropout": 0.2},
    "patterns": lambda k: {"rank_pattern": {TARGETS[k][0]: 2}, "alpha_pattern": {TARGETS[k][1]: 3}},
    "regex": lambda k: {"target_modules": {"TL": r".*\.(q|v)_proj", "TG": r".*\.attn\.c_attn",
                                           "PM": r"(lin|conv1)"}[k]},
    "all_linear": lambda k: {"target_modules": "all-linear"},
    "exclude": lambda k: {"exclude_modules": {"TL": ["model.layers.0.self_attn.q_proj"], "TG": ["h.1.mlp.c_fc"],
                                              "PM": ["conv2"]}[k]},
    "exclude_regex": lambda k: {"exclude_modules": r".*\.0\..*" if k != "PM" else r"conv.*"},
    "layers": lambda k: None if k == "PM" else {"layers_to_transform": [1],
                                                "layers_pattern": {"TL": "layers", "TG": "h"}[k]},
    "layers_int": lambda k: None if k == "PM" else {"layers_to_transform": 0},
    "bias_all": lambda k: {"bias": "all"},
    "bias_lora_only": lambda k: {"bias": "lora_only"},
    "init_gaussian": lambda k: {"init_lora_weights": "gaussian"},
    "init_pissa": lambda k: {"init_lora_weights": "pissa", **({"target_modules": ["emb", "lin"]} if k == "PM" else {})},
    "init_olora": lambda k: {"init_lora_weights": "olora", **({"target_modules": ["lin"]} if k == "PM" else {})},
    "init_false": lambda k: {"init_lora_weights": False},
    "modules_to_save": lambda k: {"modules_to_save": {"TL": ["lm_head"], "TG": ["ln_f"], "PM": ["classifier"]}[k]},
    "modules_to_save_nested": lambda k: None if k == "PM" else {"modules_to_save": {"TL": ["layers.1.mlp"],
                                                                                    "TG": ["h.1.mlp"]}[k]},
    "default_targets": lambda k: None if k == "PM" else {"target_modules": None},  # PEFT's per-architecture default
    "fan_in_fan_out": lambda k: {"fan_in_fan_out": True},
    "dropout": lambda k: {"lora_dropout": 0.1},
    "embedding": lambda k: {"target_modules": {"TL": ["embed_tokens", "q_proj"], "TG": ["wte", "c_attn"],
                                               "PM": ["emb"]}[k]},
    "embedding_dora": lambda k: {"use_dora": True,
                                 "target_modules": {"TL": ["embed_tokens", "q_proj"], "TG": ["wte", "c_attn"],
                                                    "PM": ["emb"]}[k]},
    # hosts with a bias only (TL's projections and nn.Embedding have none: those refuse to merge)
    "lora_bias": lambda k: None if k == "TL" else {"lora_bias": True, "target_modules": TARGETS[k][1:]},
}
NOT_IDENTITY = {"init_false"}
CASES = [(k, v) for v in V for k in MAKERS if V[v](k) is not None]


def config_for(kind, variant, **extra):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind]}
    kw.update(V[variant](kind))
    kw.update(extra)
    return dt.LoraConfig(**kw)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def base_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in f".{k}"}


def trainable_expected(model, kind, variant, cfg):
    """Names that must require grad: adapter tensors and modules_to_save copies (under
    ``.adapters.``), and the trained base biases of the ``bias`` option."""
    names = {n for n, _ in model.named_parameters() if ".adapters." in f".{n}"}
    hosts = dt.get_record(model, "default").hosts
    for n, _ in model.named_parameters():
        if ".adapters." in f".{n}" or not n.endswith("bias"):
            continue
        owner = n.rsplit(".", 1)[0]
        if cfg.bias == "all" or (cfg.bias == "lora_only" and owner in hosts):
            names.add(n)
    return names


# ----------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("kind,variant", CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_invariants(kind, variant, tmp_path):
    make = MAKERS[kind]
    model = make()
    base_names = [n for n, _ in model.named_parameters()]
    base_sd = base_tensors(model)
    with torch.no_grad():
        L0 = run(model, kind)
    cfg = config_for(kind, variant)

    # same object, names unchanged, base checkpoint still loads
    out = dt.inject(model, cfg)
    assert out is model
    assert [n for n, _ in model.named_parameters() if ".adapters." not in f".{n}"] == base_names
    res = make().state_dict()
    missing, unexpected = model.load_state_dict(res, strict=False)
    assert unexpected == [] and all(".adapters." in f".{k}" for k in missing), (missing, unexpected)
    if variant in ("init_pissa", "init_olora"):  # the residual base weights were just overwritten
        dt.delete_adapter(model, "default")
        dt.inject(model, cfg)
    for p in model.parameters():
        assert p.grad is None

    # identity init
    with torch.no_grad():
        L_init = run(model, kind)
    if variant in NOT_IDENTITY:
        assert rel_err(L_init, L0) > 1e-4
    else:
        assert rel_err(L_init, L0) <= 1e-5, rel_err(L_init, L0)

    # trainable set and gradients
    want = trainable_expected(model, kind, variant, cfg)
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == want and got
    emulate_training(model)
    g = torch.Generator().manual_seed(3)
    with torch.enable_grad():
        y = run(model, kind)
        (y * torch.randn(y.shape, generator=g)).sum().backward()
    for n, p in model.named_parameters():
        if n in want:
            assert p.grad is not None and p.grad.norm() > 0, f"no gradient reached {n}"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        L1 = run(model, kind)
    assert rel_err(L1, L0) > 1e-4, "training noise did not change the output: the checks below prove nothing"

    # disabled == base exactly (modules_to_save copies bypassed, trained biases and PiSSA residuals restored)
    with dt.disable_adapter(model), torch.no_grad():
        assert torch.equal(run(model, kind), L0)
    with torch.no_grad():
        assert torch.equal(run(model, kind), L1)

    # merged == unmerged; unmerge restores the base tensors exactly
    before = base_tensors(model)
    dt.merge(model, safe_merge=True)
    assert merged_adapters(model) == ["default"]
    with torch.no_grad():
        Lm = run(model, kind)
    assert rel_err(Lm, L1) <= 1e-5, rel_err(Lm, L1)
    with dt.disable_adapter(model), torch.no_grad():
        assert torch.equal(run(model, kind), L0)
    dt.unmerge(model)
    after = base_tensors(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"unmerge did not restore {k}"
    if kind == "TG":  # the tie of lm_head and wte is restored too
        assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(run(model, kind), L1)

    # save -> load into a fresh model: identical outputs
    dt.save_adapter(model, str(tmp_path / "a"))
    fresh = dt.load_adapter(make(), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(run(fresh, kind), L1)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference by default
    fresh2 = dt.load_adapter(make(), str(tmp_path / "a"), is_trainable=True)
    assert {n for n, p in fresh2.named_parameters() if p.requires_grad} == want

    # a file none of whose keys match, and a file with a wrong shape, are errors naming keys
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file({k.replace("base_model.model.", "base_model.model.nothing."): v for k, v in sd.items()},
              str(bad / "adapter_model.safetensors"))
    target = make()
    with pytest.raises(ValueError, match=r"match nothing in the model: base_model\.model\.nothing\."):
        dt.load_adapter(target, str(bad))
    assert get_state(target) is None  # nothing left behind
    key = sorted(k for k in sd if ".lora_" in k)[0]
    sd2 = dict(sd)
    sd2[key] = torch.zeros(*(s + 1 for s in sd[key].shape))
    save_file(sd2, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(key)):
        dt.load_adapter(make(), str(bad))

    # deleting the adapter gives back the base model
    dt.delete_adapter(model, "default")
    assert get_state(model) is None
    with torch.no_grad():
        assert torch.equal(run(model, kind), L0)
    assert base_tensors(model).keys() == base_sd.keys()
    for k, v in base_tensors(model).items():
        assert torch.equal(v, base_sd[k]), k
    _assert_plain(model)


def _assert_plain(model):
    """No deltatune child, hook, forward override or attribute is left anywhere."""
    for name, mod in model.named_modules():
        assert "adapters" not in mod._modules, name
        assert not any(h is _output_hook for h in mod._forward_hooks.values()), name
        assert not any(h is _input_hook for h in mod._forward_pre_hooks.values()), name
        assert "forward" not in mod.__dict__, name
        assert not [k for k in mod.__dict__ if k.startswith("_deltatune")], (name, list(mod.__dict__))


# ----------------------------------------------------------------------------- errors and management
@pytest.mark.parametrize("kind", list(MAKERS))
def test_no_match_lists_nearest_names_and_leaves_model_untouched(kind):
    model = make_pm() if kind == "PM" else MAKERS[kind]()
    for p in model.parameters():
        p.requires_grad_(True)
    wrong = {"TL": "q_projj", "TG": "c_atn", "PM": "conv"}[kind]
    nearest = {"TL": "q_proj", "TG": "c_attn", "PM": "conv1"}[kind]
    with pytest.raises(ValueError, match=rf"matched no adaptable module; nearest module names: .*{nearest}"):
        dt.inject(model, dt.LoraConfig(target_modules=[wrong]))
    assert get_state(model) is None
    assert all(p.requires_grad for p in model.parameters())  # the freeze was undone
    _assert_plain(model)


def test_unsupported_target_module_is_an_error():
    model = make_tl()
    with pytest.raises(ValueError, match=r"cannot adapt: .*mlp \(LlamaMLP\)"):
        dt.inject(model, dt.LoraConfig(target_modules=["q_proj", "mlp"]))
    assert get_state(model) is None


def test_modules_to_save_matching_nothing_names_nearest():
    with pytest.raises(ValueError, match=r"modules_to_save entries \['lm_haed'\].*lm_head"):
        dt.inject(make_tl(), dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_haed"]))


@pytest.mark.parametrize("name", ["training", "keys", "a.b", "", "with space"])
def test_bad_adapter_names_are_refused(name):
    with pytest.raises(ValueError, match="adapter name"):
        dt.inject(make_tl(), dt.LoraConfig(target_modules=["q_proj"]), adapter_name=name)


def test_unsupported_peft_field_is_refused_not_ignored(tmp_path):
    cfg = dt.LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "use_qalora": False,
                                   "layer_replication": [[0, 1], [0, 2]]})
    with pytest.raises(ValueError, match="layer_replication"):
        dt.inject(make_tl(), cfg)
    ok = dt.LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "layer_replication": None})
    dt.inject(make_tl(), ok)


def test_hook_reads_keyword_input():
    model = make_pm()
    dt.inject(model, dt.LoraConfig(target_modules=["lin"], init_lora_weights=False))
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(model.lin(input=x), model.lin(x))
        with dt.disable_adapter(model):
            base = model.lin(x)
        assert not torch.allclose(model.lin(x), base)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["TL", "TG", "PM"])
def test_several_adapters_set_adapter_list_merge_delete(kind, use_dora):
    make = MAKERS[kind]
    model = make()
    with torch.no_grad():
        L0 = run(model, kind)
    dt.inject(model, config_for(kind, "plain", use_dora=use_dora), "a")
    dt.inject(model, config_for(kind, "plain", use_dora=use_dora, r=2), "b")
    assert dt.active_adapters(model) == ["a"] and dt.adapter_names(model) == ["a", "b"]
    dt.set_adapter(model, ["a", "b"])
    emulate_training(model)
    # both active: both train, both apply
    tr = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in tr) and any(".adapters.b." in n for n in tr)
    with torch.no_grad():
        Lab = run(model, kind)
        dt.set_adapter(model, "a")
        La = run(model, kind)
        dt.set_adapter(model, "b")
        Lb = run(model, kind)
    assert not any(".adapters.a." in n for n, p in model.named_parameters() if p.requires_grad)
    assert min(rel_err(Lab, La), rel_err(Lab, Lb), rel_err(La, Lb)) > 1e-4
    # merged == unmerged with two adapters on one layer (DoRA's norm is taken on the unmerged base)
    dt.set_adapter(model, ["a", "b"])
    dt.merge(model)
    with torch.no_grad():
        assert rel_err(run(model, kind), Lab) <= 1e-5
    # merging only one, the other unmerged, still computes the same
    dt.unmerge(model, ["b"])
    assert merged_adapters(model) == ["a"]
    with torch.no_grad():
        assert rel_err(run(model, kind), Lab) <= 1e-5
    # set_adapter unmerges adapters it deactivates
    with pytest.warns(UserWarning, match="unmerging"):
        dt.set_adapter(model, "b")
    assert merged_adapters(model) == []
    with torch.no_grad():
        assert torch.equal(run(model, kind), Lb)
    # a saved "b" alone reproduces Lb on a fresh model
    dt.delete_adapter(model, "a")
    assert dt.adapter_names(model) == ["b"] and dt.active_adapters(model) == ["b"]
    with torch.no_grad():
        assert torch.equal(run(model, kind), Lb)
    dt.delete_adapter(model, "b")
    with torch.no_grad():
        assert torch.equal(run(model, kind), L0)
    _assert_plain(model)


MU_CASES = [(k, v) for v in ["plain", "dora", "modules_to_save", "modules_to_save_nested", "bias_all", "embedding",
                              "embedding_dora", "init_pissa", "lora_bias"] for k in MAKERS if V[v](k) is not None]


@pytest.mark.parametrize("kind,variant", MU_CASES, ids=[f"{k}-{v}" for k, v in MU_CASES])
def test_merge_and_unload_gives_plain_model(kind, variant):
    model = MAKERS[kind]()
    dt.inject(model, config_for(kind, variant))
    emulate_training(model)
    with torch.no_grad():
        L1 = run(model, kind)
    types_before = [(n, type(m)) for n, m in model.named_modules() if "adapters" not in n.split(".")]
    out = dt.merge_and_unload(model)
    assert out is model
    _assert_plain(model)
    assert get_state(model) is None
    assert all(".adapters." not in f".{n}" for n in model.state_dict())
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    with torch.no_grad():
        assert rel_err(run(model, kind), L1) <= 1e-5
    # it is a base model again: its state_dict loads into a fresh base strictly
    MAKERS[kind]().load_state_dict(model.state_dict(), strict=True)


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = make_tg()
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], use_dora=True))
    emulate_training(model)
    with torch.no_grad():
        L1 = run(model, "TG")
        model.transformer.h[1].attn.c_proj.adapters.default.lora_B.weight[0, 0] = float("nan")
    before = base_tensors(model)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_proj gives non-finite"):
        dt.merge(model, safe_merge=True)
    assert merged_adapters(model) == []
    for k, v in base_tensors(model).items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="non-finite"):
        dt.merge_and_unload(model, safe_merge=True)
    assert dt.adapter_names(model) == ["default"]  # still adapted, nothing written
    for k, v in base_tensors(model).items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.adapters.default.lora_B.weight[0, 0] = 0.0
        L1b = run(model, "TG")
    dt.merge(model, safe_merge=True)
    with torch.no_grad():
        assert rel_err(run(model, "TG"), L1b) <= 1e-5
    assert torch.isfinite(L1).all()


def test_print_trainable_parameters_line(capsys):
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    line = dt.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})", line)
    assert m, line
    t, n = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))
    # 2 layers x (q: 4*32 + 32*4, v: 4*32 + 16*4) + lm_head copy 128*32
    assert t == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) + 128 * 32
    assert n == sum(p.numel() for p in make_tl().parameters()) + t
    assert m.group(3) == f"{100 * t / n:.4f}"


def test_trained_biases_are_each_adapters_own_and_follow_the_active_set():
    """An adapter's trained biases are its own: the model holds them only while it is active; two
    adapters training the same bias cannot be active together (each would see the other's values)."""
    model = make_tg()
    ln_b = model.transformer.h[0].ln_1.bias
    attn_b = model.transformer.h[0].attn.c_attn.bias
    ln0, attn0 = ln_b.detach().clone(), attn_b.detach().clone()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"), "lo")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["c_fc"], bias="all"), "all")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["c_proj"]), "none")
    assert attn_b.requires_grad and not ln_b.requires_grad
    with pytest.raises(ValueError, match=r"'lo' and 'all' both change the base tensor 'transformer\.h\.0\.attn"):
        dt.set_adapter(model, ["lo", "all"])
    assert dt.active_adapters(model) == ["lo"] and attn_b.requires_grad  # nothing changed
    with torch.no_grad():
        attn_b.add_(2.0)  # "lo" trains its bias
    dt.set_adapter(model, ["all", "none"])  # "none" must not switch off what "all" trains
    assert ln_b.requires_grad and attn_b.requires_grad
    assert torch.equal(attn_b, attn0)  # "all" starts from the original, not from "lo"'s values
    with torch.no_grad():
        ln_b.add_(1.0)
    dt.set_adapter(model, "none")
    assert not ln_b.requires_grad and not attn_b.requires_grad
    assert torch.equal(ln_b, ln0) and torch.equal(attn_b, attn0)  # inactive adapters change nothing
    dt.set_adapter(model, "all")
    assert torch.equal(ln_b, ln0 + 1.0)  # its own values are back
    dt.set_adapter(model, "lo")
    assert torch.equal(attn_b, attn0 + 2.0) and torch.equal(ln_b, ln0)
    dt.delete_adapter(model, "all")
    dt.delete_adapter(model, "lo")
    assert torch.equal(ln_b, ln0) and torch.equal(attn_b, attn0)  # originals restored
    assert not ln_b.requires_grad and not attn_b.requires_grad


def test_adapter_dtype_option_and_default():
    model = make_tl().to(torch.bfloat16)
    dt.inject(model, dt.LoraConfig(target_modules=["q_proj"]), "f32")
    dt.inject(model, dt.LoraConfig(target_modules=["v_proj"]), "bf", adapter_dtype="base")
    q = model.model.layers[0].self_attn.q_proj.adapters.f32
    v = model.model.layers[0].self_attn.v_proj.adapters.bf
    assert q.lora_A.weight.dtype == torch.float32 and v.lora_A.weight.dtype == torch.bfloat16


def test_config_json_round_trip_keeps_unknown_keys(tmp_path):
    cfg = dt.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    cfg.extra["some_future_field"] = {"x": 1}
    cfg.save(str(tmp_path))
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == "LORA" and d["some_future_field"] == {"x": 1} and d["rank_pattern"] == {"q_proj": 2}
    back = dt.load_config(str(tmp_path))
    assert back == cfg and back.extra == {"some_future_field": {"x": 1}}
    assert os.listdir(tmp_path) == ["adapter_config.json"]  # atomic write left no temporary file


@pytest.mark.parametrize("kind", ["TL", "TG", "PM"])
def test_inference_fast_path_equals_autograd_path_and_spares_other_hooks(kind):
    """Without autograd, LoRA adds into the host output in place (one BLAS call, no copy). It must
    compute what the autograd path computes, also with a DoRA adapter on the same layers, and it
    must never change a tensor another hook has already seen."""
    model = MAKERS[kind]()
    first = TARGETS[kind][0] if kind != "PM" else "lin"
    host = next(m for n, m in model.named_modules() if n.endswith(first))
    seen = []
    host.register_forward_hook(lambda m, a, out: seen.append((out, out.clone())))  # registered before inject
    dt.inject(model, config_for(kind, "plain"), "a")
    dt.inject(model, config_for(kind, "plain", use_dora=True), "b")
    emulate_training(model)
    for active in (["a"], ["a", "b"], ["b", "a"]):
        dt.set_adapter(model, active)
        with torch.enable_grad():
            ref = run(model, kind).detach()
        with torch.no_grad():
            fast = run(model, kind)
        with torch.inference_mode():
            fast2 = run(model, kind)
        assert rel_err(fast, ref) <= 1e-6 and rel_err(fast2, ref) <= 1e-6
    assert all(torch.equal(t, c) for t, c in seen), "an adapter modified a tensor another hook had seen"


def test_core_import_needs_only_torch_and_safetensors():
    """Issue 2: hard dependencies are torch and safetensors; transformers & co. load lazily."""
    import subprocess
    import sys

    code = ("import sys, deltatune; bad = [m for m in ('transformers', 'peft', 'datasets', 'accelerate', 'torchao', "
            "'bitsandbytes', 'gguf', 'matplotlib') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_save_is_atomic_when_a_write_fails(tmp_path, monkeypatch):
    """A crash while saving leaves the previous adapter loadable and no temporary file behind."""
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    dt.save_adapter(model, str(tmp_path))
    with torch.no_grad():
        L_old = run(model, "TL")
        emulate_training(model)
    import deltatune.formats.peft as fmt

    real_fsync = os.fsync

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(fmt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        dt.save_adapter(model, str(tmp_path))
    monkeypatch.setattr(fmt.os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        assert torch.equal(run(dt.load_adapter(make_tl(), str(tmp_path)), "TL"), L_old)


def test_saved_files_have_the_usual_permissions(tmp_path):
    """Atomic writes go through a temporary file (mkstemp makes it 0600); the result must be readable
    by others as any file the user creates (umask applied), e.g. by a serving process."""
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    old = os.umask(0o022)
    try:
        dt.save_adapter(model, str(tmp_path))
    finally:
        os.umask(old)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o644, f
