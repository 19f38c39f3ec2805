"""LoHa, LoKr, VeRA, AdaLoRA, OFT and BOFT beyond the invariant matrix and the peft interop file:
reference formulas checked against peft's own helpers, the shared VeRA projections' lifecycle,
rotations stacked on one layer (merge order), what is refused and why, and AdaLoRA through the one
training loop (its TrainHook: schedule, regulariser split, saved rank pattern)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import X_IDS, emulate_training, make_pc, make_tl, make_tt, maxdiff, rel_err, run
from deltatune.methods.boft import BOFTAdapter
from deltatune.methods.lycoris import factorization
from deltatune.methods.vera import CONTAINER, projections_for

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids or X_IDS)).logits


# ----------------------------------------------------------------------------- reference formulas


def test_lokr_factorization_is_lycoris_rule():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in list(range(1, 130)) + [576, 1536, 4096, 11008]:
        for factor in (-1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    assert factorization(32) == (4, 8) and factorization(127) == (1, 127) and factorization(128, 4) == (4, 32)


def test_vera_projections_are_peft_prng_draws():
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator().manual_seed(11)
    want_a, want_b = _kaiming_init((8, 40), generator=g), _kaiming_init((24, 8), generator=g)
    a, b = projections_for(8, 40, 24, key=11)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
    assert not torch.equal(projections_for(8, 40, 24, key=12)[0], a)


@pytest.mark.parametrize("factor, block", [(1, 4), (2, 4), (3, 2), (2, 8)])
def test_boft_butterfly_matches_peft_dense_formula(factor, block):
    """deltatune applies the butterfly as gathers and batched blocks; peft (with its CUDA extension)
    builds dense matrices ``P_i blockdiag(R_i) P_i^T`` and multiplies them. Same rotation, any factor."""
    from peft.tuners.boft.layer import BOFTLayer

    torch.manual_seed(0)
    host = nn.Linear(32, 12)
    ad = BOFTAdapter(host, "lin", dt.BOFTConfig(boft_block_size=block, boft_n_butterfly_factor=factor))
    with torch.no_grad():
        ad.boft_R.normal_(0, 0.3)
        ad.boft_s.normal_(1, 0.1)
    n, d = 32, 32 // block
    m = torch.eye(n)
    rot = BOFTLayer.cayley_batch(None, ad.boft_R.detach().reshape(-1, block, block)).reshape(factor, d, block, block)
    for i in range(factor):
        p = BOFTLayer.perm2mat(None, BOFTLayer.block_butterfly_perm(None, n, d // 2 ** i, block // 2, factor - 1))
        m = (p @ torch.block_diag(*rot[i]) @ p.T) @ m
    x = torch.randn(5, 32)
    want = ((x @ m) @ host.weight.T) * ad.boft_s.detach().view(-1) + host.bias

    class Call:
        pass

    call = Call()
    call.host, call.base_output = host, host(x)
    with torch.no_grad():
        got = ad(x, call.base_output, call)
        assert maxdiff(got, want) < 1e-5
        merged = ad.merge_into(host, host.weight.detach().clone())
        assert maxdiff(merged, ad.boft_s.view(-1, 1) * (host.weight @ m.T)) < 1e-5
        assert maxdiff(F.linear(x, merged, host.bias), want) < 1e-5


# ----------------------------------------------------------------------------- VeRA's shared projections


def test_vera_projections_live_once_per_adapter_and_go_with_it():
    model = make_tl()
    base_keys = list(model.state_dict())
    dt.inject(model, dt.VeraConfig(r=8, target_modules=["q_proj", "k_proj", "down_proj"]))
    proj = model.vera_projections["default"]
    assert proj.vera_A.shape == (8, 64) and proj.vera_B.shape == (32, 8)  # largest in: down_proj 64, out: 32
    ads = [m.adapters["default"] for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "down_proj"))]
    assert len(ads) == 6 and all(a.projections is proj for a in ads)
    assert [k for k in model.state_dict() if ".adapters." not in k] == base_keys  # nothing else joined the state
    assert not any("vera_A" in k for k in model.state_dict())  # not state: the adapter file carries them
    assert "vera_projections.default" in dt.get_record(model).modules
    dt.inject(model, dt.VeraConfig(r=4, projection_prng_key=3, target_modules=["q_proj"]), "other")
    assert set(model.vera_projections) == {"default", "other"} and model.vera_projections["other"].vera_A.shape == (4, 32)
    dt.delete_adapter(model, "default")
    assert set(model.vera_projections) == {"other"}
    dt.delete_adapter(model, "other")
    assert CONTAINER not in model._modules


def test_vera_file_that_should_carry_projections_but_does_not_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = dt.inject(make_tl(), dt.VeraConfig(r=8, target_modules=["q_proj"]))
    dt.save_adapter(model, str(tmp_path))
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(sd)
    save_file({k: v for k, v in sd.items() if "vera_A" not in k}, str(tmp_path / "adapter_model.safetensors"))
    fresh = make_tl()
    with pytest.raises(ValueError, match="has no 'base_model.vera_A'"):
        dt.load_adapter(fresh, str(tmp_path))
    assert dt.adapter_names(fresh) == [] and CONTAINER not in fresh._modules


# ----------------------------------------------------------------------------- rotations on one layer


def _two_ofts():
    model = make_tl()
    for name, seed in (("a", 1), ("b", 2)):
        dt.inject(model, dt.OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"]), name)
        dt.set_adapter(model, name)
        emulate_training(model, std=0.2, seed=seed)
    dt.set_adapter(model, ["a", "b"])
    return model


def test_two_rotations_merge_in_the_forward_order():
    model = _two_ofts()
    y = logits(model)
    dt.set_adapter(model, ["b", "a"])
    assert maxdiff(logits(model), y) > 1e-4  # the rotations do not commute: the order matters
    dt.set_adapter(model, ["a", "b"])
    dt.merge(model)
    assert rel_err(logits(model), y) < 1e-5
    dt.unmerge(model)
    dt.merge(model, adapter_names=["b"])  # the later input rotation next to the weight: representable
    assert rel_err(logits(model), y) < 1e-5
    dt.unmerge(model)
    with pytest.raises(ValueError, match="do not commute"):
        dt.merge(model, adapter_names=["a"])  # would apply a after b
    assert dt.merged_adapters(model) == [] and torch.equal(logits(model), y)


def test_oft_refuses_kxk_convolutions_and_boft_refuses_to_follow_an_unmerged_adapter():
    with pytest.raises(ValueError, match="only 1x1 convolutions"):
        dt.inject(make_pc(), dt.OFTConfig(oft_block_size=4, target_modules=["conv3"]))
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "lora")
    dt.inject(model, dt.BOFTConfig(boft_block_size=8, target_modules=["q_proj"]), "boft")
    dt.set_adapter(model, ["boft", "lora"])
    emulate_training(model, std=0.1)
    y = logits(model)  # BOFT first, then LoRA's term: fine, and merged alike
    dt.merge(model)
    assert rel_err(logits(model), y) < 1e-5
    dt.unmerge(model)
    dt.set_adapter(model, ["lora", "boft"])
    with pytest.raises(ValueError, match="cannot follow another unmerged adapter"):
        logits(model)
    dt.merge(model)  # merged, the pair is one weight: no refusal
    merged = logits(model)
    dt.unmerge(model)
    dt.set_adapter(model, ["lora"])
    dt.merge(model)
    dt.set_adapter(model, ["lora", "boft"])  # set_adapter unmerges (order changed)
    dt.merge(model, adapter_names=["lora"])  # LoRA in the weight, BOFT running over it
    assert rel_err(logits(model), merged) < 1e-5


def test_oft_one_by_one_conv_rotates_channels_as_merge_does():
    model = dt.inject(make_pc(), dt.OFTConfig(oft_block_size=4, target_modules=["conv_in", "conv_out"]))
    emulate_training(model, std=0.3)
    with torch.no_grad():
        y = run(model, "PC")
        dt.merge(model)
        assert rel_err(run(model, "PC"), y) < 1e-5


# ----------------------------------------------------------------------------- AdaLoRA in the one loop


def _items(n=8):
    from conftest import make_dv
    from deltatune.train.data import ChatEncoder, Example

    enc = ChatEncoder(make_tt())
    return [enc.encode(Example(messages=m)) for m in make_dv(n)]


def _adalora_model(**kw):
    torch.manual_seed(0)
    cfg = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], total_step=100, tinit=1,
               tfinal=2)
    cfg.update(kw)
    return dt.inject(make_tl(), dt.AdaLoraConfig(**cfg))


def test_adalora_trains_through_the_loop_and_saves_its_rank_pattern(tmp_path):
    from peft import PeftModel

    from deltatune.train.loop import Trainer

    model = _adalora_model(total_step=12, tinit=2, tfinal=4)
    with pytest.warns(UserWarning, match="total_step=12 but this training run takes 6"):
        tr = Trainer(model, _items(), pad_id=0, lr=5e-2, batch_size=2, max_steps=6, warmup_steps=0)
    tr.fit()
    cfg = dt.get_config(model)
    assert (cfg.total_step, cfg.tinit, cfg.tfinal) == (6, 1, 2) and cfg.rank_pattern is not None
    kept = {k: sum(v) for k, v in cfg.rank_pattern.items()}
    assert len(kept) == 4 and sum(kept.values()) == 2 * 4  # the budget reached target_r per matrix
    for path in dt.get_record(model).hosts:
        e = model.get_submodule(path).adapters.default.lora_E.detach().view(-1)
        mask = torch.tensor(cfg.rank_pattern[f"{path}.lora_E"])
        assert torch.all(e[~mask] == 0) and torch.all(e[mask] != 0)
    y = logits(model)
    dt.save_adapter(model, str(tmp_path))
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    for path in dt.get_record(model).hosts:
        r = kept[f"{path}.lora_E"]
        assert sd[f"base_model.model.{path}.lora_A"].shape[0] == r == sd[f"base_model.model.{path}.lora_B"].shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(make_tl(), str(tmp_path)).eval()
    assert maxdiff(logits(pm), y) < 1e-5
    assert maxdiff(logits(dt.load_adapter(make_tl(), str(tmp_path))), y) < 1e-5


@pytest.mark.parametrize("batch_size, grad_accum", [(1, 4), (2, 2)])
def test_adalora_regulariser_counts_once_per_step_whatever_the_split(batch_size, grad_accum):
    from deltatune.train.loop import Trainer

    items = _items(4)

    def grads(bs, ga):
        model = _adalora_model(total_step=1, tinit=0, tfinal=0, init_lora_weights=False)
        tr = Trainer(model, items, pad_id=0, lr=1e-3, batch_size=bs, grad_accum=ga, max_steps=1)
        got = {}
        tr.optimizer.register_step_pre_hook(lambda *a: got.update(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        tr.fit()
        return got

    ref, got = grads(4, 1), grads(batch_size, grad_accum)
    for n in ref:
        assert rel_err(got[n], ref[n]) < 1e-5, n
    # teeth: without the regulariser the gradient of A differs clearly
    model = _adalora_model(total_step=1, tinit=0, tfinal=0, init_lora_weights=False, orth_reg_weight=0.0)
    tr = Trainer(model, items, pad_id=0, lr=1e-3, batch_size=4, max_steps=1)
    plain = {}
    tr.optimizer.register_step_pre_hook(lambda *a: plain.update(
        {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    tr.fit()
    assert max(rel_err(plain[n], ref[n]) for n in ref if n.endswith("lora_A")) > 1e-2


def test_adalora_config_checks():
    with pytest.raises(ValueError, match="total_step"):
        dt.AdaLoraConfig()
    with pytest.raises(ValueError, match="no budgeting phase"):
        dt.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="DoRA"):
        dt.AdaLoraConfig(total_step=10, use_dora=True)
    with pytest.raises(ValueError, match="rank_pattern keys"):
        dt.inject(make_tl(), dt.AdaLoraConfig(total_step=10, target_modules=["q_proj"],
                                              rank_pattern={"model.nowhere.lora_E": [True] * 12}))


# ----------------------------------------------------------------------------- deltatune inspect


@pytest.mark.parametrize("cfg", [
    dt.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], alpha_pattern={"down_proj": 3}),
    dt.LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "down_proj"]),
    dt.AdaLoraConfig(init_r=4, lora_alpha=8, total_step=5, target_modules=["q_proj", "down_proj"],
                     rank_pattern={"model.layers.1.mlp.down_proj.lora_E": [True, False, True, True]}),
], ids=["loha", "lokr", "adalora"])
def test_inspect_norm_is_the_norm_of_the_weight_update(cfg, tmp_path):
    from deltatune.formats.describe import describe_adapter

    model = dt.inject(make_tl(), cfg)
    emulate_training(model, std=0.1)
    dt.save_adapter(model, str(tmp_path))
    info = describe_adapter(str(tmp_path))
    assert info["method"] == cfg.peft_type and len(info["modules"]) == 4
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    dt.merge(model)
    for row in info["modules"]:
        delta = model.get_submodule(row["module"]).weight.detach() - w0[row["module"] + ".weight"]
        assert abs(row["norm"] - float(torch.linalg.norm(delta))) < 1e-4 * max(1.0, row["norm"]), row
    if cfg.peft_type == "ADALORA":
        assert [r["rank"] for r in info["modules"]] == [4, 4, 3, 4]  # layers.1.mlp.down_proj kept 3
