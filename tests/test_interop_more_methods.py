"""Interop with the real Hugging Face ``peft`` for LoHa, LoKr, VeRA, AdaLoRA, OFT and BOFT.

On tiny Llama (TL: nn.Linear, nn.Embedding), tiny GPT-2 (TG: transformers Conv1D where peft adapts it
with the method, else the nn.Linear head and the embedding) and small convolution models (PM, PC):

* an adapter saved by deltatune loads in ``peft.PeftModel.from_pretrained`` (peft finds every tensor
  of the file) and one saved by ``peft`` loads in ``deltatune.load_adapter``; outputs agree to max
  |diff| < 1e-5 in fp32, and deltatune writes peft's file back key for key;
* merged outputs agree with peft's ``merge_and_unload`` where peft's merge is right;
* trainable parameter counts equal peft's (AdaLoRA: peft's total also counts its constant ``ranknum``);
* ``adapter_config.json`` round-trips both ways;
* AdaLoRA's rank allocator, run by deltatune's hook, prunes what peft's ``update_and_allocate`` prunes.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import deltatune as dt

from conftest import MAKERS, X_IDS, emulate_training, maxdiff, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out / save_projection / CUDA-extension notices
        yield


TL3 = ["q_proj", "v_proj", "down_proj"]
# id -> (model kind, deltatune config class, peft config class, kwargs (the same names on both sides), noise)
CASES = {
    "loha-TL": ("TL", dt.LoHaConfig, peft.LoHaConfig, dict(r=4, alpha=8, target_modules=TL3), 0.05),
    "loha-TL-patterns": ("TL", dt.LoHaConfig, peft.LoHaConfig, dict(
        r=4, alpha=8, target_modules=TL3, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3}), 0.05),
    "loha-TG-head": ("TG", dt.LoHaConfig, peft.LoHaConfig, dict(r=4, alpha=8, target_modules=["lm_head"]), 0.05),
    "loha-PM-conv": ("PM", dt.LoHaConfig, peft.LoHaConfig, dict(r=3, alpha=6, target_modules=["conv1", "conv2", "lin"]),
                     0.1),
    "loha-PM-cp": ("PM", dt.LoHaConfig, peft.LoHaConfig, dict(r=3, alpha=6, use_effective_conv2d=True,
                                                              target_modules=["conv1", "conv2"]), 0.3),
    "lokr-TL": ("TL", dt.LoKrConfig, peft.LoKrConfig, dict(r=4, alpha=8, target_modules=TL3), 0.05),
    "lokr-TL-decompose": ("TL", dt.LoKrConfig, peft.LoKrConfig, dict(r=2, alpha=8, decompose_both=True,
                                                                     target_modules=TL3), 0.05),
    "lokr-TG-head": ("TG", dt.LoKrConfig, peft.LoKrConfig, dict(r=2, alpha=4, target_modules=["lm_head"]), 0.05),
    "lokr-PM-conv": ("PM", dt.LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=2, target_modules=["conv1", "conv2"]), 0.1),
    "lokr-PM-cp": ("PM", dt.LoKrConfig, peft.LoKrConfig, dict(r=1, alpha=2, use_effective_conv2d=True,
                                                              target_modules=["conv2"]), 0.3),
    "vera-TL": ("TL", dt.VeraConfig, peft.VeraConfig, dict(r=16, target_modules=TL3), 0.3),
    "vera-TG": ("TG", dt.VeraConfig, peft.VeraConfig, dict(r=16, target_modules=["c_attn", "c_proj", "c_fc"]), 0.3),
    "vera-TL-no-projection": ("TL", dt.VeraConfig, peft.VeraConfig, dict(
        r=8, save_projection=False, projection_prng_key=7, target_modules=TL3), 0.3),
    "adalora-TL": ("TL", dt.AdaLoraConfig, peft.AdaLoraConfig, dict(
        init_r=6, target_r=2, total_step=10, lora_alpha=8, target_modules=TL3), 0.1),
    "adalora-TG": ("TG", dt.AdaLoraConfig, peft.AdaLoraConfig, dict(
        init_r=6, target_r=2, total_step=10, lora_alpha=8, target_modules=["c_attn", "c_proj"]), 0.1),
    "oft-TL": ("TL", dt.OFTConfig, peft.OFTConfig, dict(oft_block_size=8, target_modules=TL3 + ["embed_tokens"]), 0.1),
    "oft-TL-exact-r4": ("TL", dt.OFTConfig, peft.OFTConfig, dict(oft_block_size=0, r=4, use_cayley_neumann=False,
                                                                 target_modules=TL3), 0.1),
    "oft-TL-coft-share": ("TL", dt.OFTConfig, peft.OFTConfig, dict(oft_block_size=8, coft=True, eps=1e-2,
                                                                   block_share=True, target_modules=TL3), 0.1),
    "oft-TG-head-wte": ("TG", dt.OFTConfig, peft.OFTConfig, dict(oft_block_size=8, target_modules=["lm_head", "wte"]),
                        0.1),
    "oft-PC-1x1": ("PC", dt.OFTConfig, peft.OFTConfig, dict(oft_block_size=4, target_modules=["conv_in", "conv_out"]),
                   0.1),
    "boft-TL": ("TL", dt.BOFTConfig, peft.BOFTConfig, dict(boft_block_size=8, target_modules=TL3), 0.1),
    "boft-TL-blocknum": ("TL", dt.BOFTConfig, peft.BOFTConfig, dict(boft_block_size=0, boft_block_num=4,
                                                                    target_modules=TL3), 0.1),
    "boft-TG-head": ("TG", dt.BOFTConfig, peft.BOFTConfig, dict(boft_block_size=4, target_modules=["lm_head"]), 0.1),
    "boft-PC-conv": ("PC", dt.BOFTConfig, peft.BOFTConfig, dict(boft_block_size=4, target_modules=["conv_in", "conv3"]),
                     0.1),
}
IDS = sorted(CASES)
LM = {"TL", "TG"}


def output(model, kind):
    with torch.no_grad():
        return run(model, kind)


def ours(case):
    kind, cls, _, kw, std = CASES[case]
    model = dt.inject(MAKERS[kind](), cls(**kw))
    emulate_training(model, std=std)
    return model


def theirs(case):
    kind, _, cls, kw, std = CASES[case]
    torch.manual_seed(0)
    pm = get_peft_model(MAKERS[kind](), cls(**kw))
    emulate_training(pm, std=std)
    return pm.eval()


@pytest.mark.parametrize("case", IDS)
def test_deltatune_saved_loads_in_peft(case, tmp_path):
    kind = CASES[case][0]
    model = ours(case)
    y = output(model, kind)
    assert maxdiff(y, output(MAKERS[kind](), kind)) > 1e-3  # the adapter matters
    dt.save_adapter(model, str(tmp_path))
    pm = PeftModel.from_pretrained(MAKERS[kind](), str(tmp_path)).eval()
    assert maxdiff(output(pm, kind), y) < 1e-5
    # peft found every tensor of the file: its adapter state is the file
    from peft.utils import get_peft_model_state_dict

    file_sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    peft_sd = get_peft_model_state_dict(pm, save_embedding_layers=False)
    assert set(peft_sd) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(peft_sd[k], v), k


@pytest.mark.parametrize("case", IDS)
def test_peft_saved_loads_in_deltatune(case, tmp_path):
    kind = CASES[case][0]
    pm = theirs(case)
    y = output(pm, kind)
    assert maxdiff(y, output(MAKERS[kind](), kind)) > 1e-3
    pm.save_pretrained(str(tmp_path))
    model = MAKERS[kind]()
    assert dt.load_adapter(model, str(tmp_path)) is model
    assert maxdiff(output(model, kind), y) < 1e-5
    # deltatune writes back the same tensors under the same keys
    dt.save_adapter(model, str(tmp_path / "again"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    file_sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(again) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(again[k], v), k
    # merged: deltatune's merge reproduces peft's unmerged output
    dt.merge(model)
    assert maxdiff(output(model, kind), y) < 1e-5


@pytest.mark.parametrize("case", [c for c in IDS if CASES[c][0] in LM and "-TG-head" not in c])
def test_merged_weights_agree_with_peft_merge_and_unload(case, tmp_path):
    """Where peft's merge is right both merges give the same plain model (not on TG's head, which is
    tied to the input embedding: peft's merge writes into the shared tensor and so changes the
    embedding too; deltatune gives the head its own merged copy, see test_cases_core)."""
    kind = CASES[case][0]
    pm = theirs(case)
    pm.save_pretrained(str(tmp_path))
    model = dt.load_adapter(MAKERS[kind](), str(tmp_path))
    merged_ours = dt.merge_and_unload(model)
    merged_peft = pm.merge_and_unload()
    assert maxdiff(output(merged_ours, kind), output(merged_peft, kind)) < 1e-5


@pytest.mark.parametrize("case", IDS)
def test_trainable_parameter_counts_equal_peft(case):
    kind, cls, pcls, kw, _ = CASES[case]
    pm = get_peft_model(MAKERS[kind](), pcls(**kw))
    model = dt.inject(MAKERS[kind](), cls(**kw))
    trainable, total = dt.count_parameters(model)
    p_trainable, p_total = pm.get_nb_trainable_parameters()
    assert trainable == p_trainable > 0
    # peft keeps AdaLoRA's constant rank number as a frozen one-element parameter per layer; deltatune
    # keeps it as a number
    extra = len(dt.get_record(model).hosts) if cls is dt.AdaLoraConfig else 0
    assert total + extra == p_total
    from peft.utils import get_peft_model_state_dict

    theirs_keys = set(get_peft_model_state_dict(pm, save_embedding_layers=False))
    assert theirs_keys == set(dt.adapter_state_dict(model))


@pytest.mark.parametrize("case", ["loha-TL-patterns", "lokr-TL-decompose", "vera-TL-no-projection", "adalora-TL",
                                  "oft-TL-coft-share", "boft-TL-blocknum"])
def test_adapter_config_json_round_trip_both_ways(case, tmp_path):
    kind, cls, pcls, kw, _ = CASES[case]
    pm = get_peft_model(MAKERS[kind](), pcls(**kw))
    pm.save_pretrained(str(tmp_path / "p"))
    raw = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    raw["a_key_from_the_future"] = [1, 2]
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(raw))
    cfg = dt.load_config(str(tmp_path / "p"))
    assert type(cfg) is cls and cfg.to_dict() == raw  # every key and value kept
    model = dt.load_adapter(MAKERS[kind](), str(tmp_path / "p"))
    dt.save_adapter(model, str(tmp_path / "d"))
    assert json.loads((tmp_path / "d" / "adapter_config.json").read_text()) == raw
    back = pcls.from_pretrained(str(tmp_path / "d"))
    for f in kw:
        got, want = getattr(back, f), getattr(pm.peft_config["default"], f)
        assert (set(got) == set(want)) if f == "target_modules" else got == want, f


# ----------------------------------------------------------------------------- AdaLoRA's allocator against peft's


def _adalora_pair(tmp_path, **kw):
    """A peft AdaLoRA model and a deltatune one with the same weights (trainable), and the hook."""
    from deltatune.methods.adalora import AdaLoraHook

    torch.manual_seed(0)
    cfg = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw)
    # task_type: so that peft's forward runs AdaLoraModel.forward, which adds the regulariser to the loss
    pm = get_peft_model(MAKERS["TL"](), peft.AdaLoraConfig(task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():  # B and A away from their tiny init, E non-zero: informative importance scores
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
    pm.save_pretrained(str(tmp_path))
    model = dt.load_adapter(MAKERS["TL"](), str(tmp_path), is_trainable=True)
    cfg_ours = dt.get_config(model)
    return pm, model, AdaLoraHook(model, "default", cfg_ours, cfg_ours.total_step)


def _masks(model_or_pm):
    return {n.replace("base_model.model.", "").replace(".default", "").replace(".adapters", ""): (p != 0).view(-1)
            for n, p in model_or_pm.named_parameters() if n.endswith("lora_E") or n.endswith("lora_E.default")}


def test_adalora_allocator_prunes_what_peft_prunes(tmp_path):
    total = 12
    pm, model, hook = _adalora_pair(tmp_path, total_step=total, tinit=2, tfinal=3, deltaT=2)
    ids = torch.tensor([X_IDS[0], [7, 8, 9, 10, 11, 12]])
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    opt_o = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    pm.train(), model.train()
    patterns = []
    for step in range(total):
        loss_p = pm(input_ids=ids, labels=ids).loss  # peft adds its orthogonality regulariser here
        loss_o = model(input_ids=ids, labels=ids).loss + hook.loss_term(model)
        assert abs(float(loss_p) - float(loss_o)) < 1e-5, step
        loss_p.backward(), loss_o.backward()
        opt_p.step(), opt_o.step()
        pm.base_model.update_and_allocate(step)
        hook.after_step(model, step, total)
        opt_p.zero_grad(), opt_o.zero_grad()
        mp, mo = _masks(pm), _masks(model)
        assert set(mp) == set(mo) and all(torch.equal(mp[k], mo[k]) for k in mp), step
        rp_peft = {k.replace(".default", ""): v for k, v in (pm.peft_config["default"].rank_pattern or {}).items()}
        assert rp_peft == (dt.get_config(model).rank_pattern or {}), step
        patterns.append(sum(sum(v) for v in (dt.get_config(model).rank_pattern or {}).values()))
    # the budget fell from init_r to target_r per matrix, with pruning in between
    assert patterns[0] == 0 and patterns[-1] == 2 * 4 and len(set(patterns)) > 2
    # the saved files agree: the same rank pattern and cut tensors, and each loads in the other
    pm.save_pretrained(str(tmp_path / "p")), dt.save_adapter(model, str(tmp_path / "o"))
    fp, fo = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("p", "o"))
    assert {k: v.shape for k, v in fp.items()} == {k: v.shape for k, v in fo.items()}
    for k in fp:
        assert maxdiff(fp[k], fo[k]) < 1e-5, k
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["rank_pattern"] == \
        json.loads((tmp_path / "p" / "adapter_config.json").read_text())["rank_pattern"]
    pm.eval(), model.eval()
    y = output(model, "TL")
    assert maxdiff(output(PeftModel.from_pretrained(MAKERS["TL"](), str(tmp_path / "o")).eval(), "TL"), y) < 1e-5
    assert maxdiff(output(dt.load_adapter(MAKERS["TL"](), str(tmp_path / "p")), "TL"), y) < 1e-5
