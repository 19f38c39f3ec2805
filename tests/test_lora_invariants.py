"""LoRA / rsLoRA / DoRA beyond the invariant matrix (test_matrix.py): injection errors, several adapters,
merge_and_unload, safe_merge, trainable report, bias training, adapter dtype, config JSON, the inference
fast path, core import weight and atomic saves.

Models: TL (tiny Llama, nn.Linear), TG (tiny GPT-2, transformers Conv1D, tied lm_head) and PM, a
plain nn.Module with nn.Embedding, nn.Conv1d, nn.Conv2d and nn.Linear (all with biases); conftest.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import deltatune as dt
from deltatune.adapters import get_state
from deltatune.routing import _input_hook, _output_hook
from deltatune.merge import merged_adapters

from conftest import LORA_TARGETS as TARGETS, LORA_VARIANTS as V, lora_config as config_for
from conftest import base_tensors, emulate_training, make_pm, make_tg, make_tl, rel_err, run

pytestmark = pytest.mark.usefixtures("one_thread")

MAKERS = {"TL": make_tl, "TG": make_tg, "PM": make_pm}


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
