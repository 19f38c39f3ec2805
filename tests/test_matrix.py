"""The invariant matrix of DESIGN.md: one test, every method, rows of (model maker, config).

Every row runs the same invariants, written once below, through the public API only:

  1. ``inject`` returns the same object; base parameter names are unchanged (in order); a base
     state_dict still loads (only adapter keys missing); no parameter has a gradient yet;
  2. a fresh adapter computes the base output: bit for bit (``init="exact"``), within rel 1e-5
     (``"close"``), or, for methods whose init is not the identity, clearly not (``"moves"``);
  3. exactly the adapter tensors (new parameters: adapter weights, ``modules_to_save`` copies)
     and the base tensors the row trains (LoRA's ``bias``) require grad, and every one of them gets
     a non-zero finite gradient from a loss, no frozen one any;
  4. after emulated training (noise on the trainable tensors) the output moves, so later checks
     can fail;
  5. disabled adapter == base output bit for bit (modules_to_save copies bypassed, trained biases
     and rewritten base weights restored), ``generate`` too; enabled again == trained output;
  6. mergeable rows: merged == unmerged (fp32, rel <= 1e-5), merge changes some base tensor,
     disabled-while-merged == base exactly, unmerge restores every base tensor (and weight tie) bit
     for bit; other rows: ``merge`` and ``merge_and_unload`` raise ValueError giving the reason
     (``merge_refusal``) and change nothing;
  7. save -> two files (PEFT's) -> load into a fresh model gives identical outputs, frozen by
     default, the same config (inference_mode set), and with ``is_trainable=True`` the right
     trainable set;
  8. a file whose keys match nothing, or with one wrong shape, is an error naming the key, and
     leaves the model exactly as it was;
  9. ``delete_adapter`` gives back the base model: outputs, tensors, ties, module tree and hooks.

Per-method facts are declared on the row (:class:`Row`), never tested by method name: a new
method gets every invariant by adding rows. Models and their inputs come from conftest.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt

from conftest import LORA_TARGETS, LORA_VARIANTS, MAKERS, X_IDS, emulate_training, lora_config, rel_err, run

pytestmark = pytest.mark.usefixtures("one_thread")


def no_base_tensors(model, base_names):
    return set()


def lora_trained_biases(model, base_names):
    """LoRA's ``bias`` option: every base bias ("all"), or those of the LoRA hosts ("lora_only")."""
    cfg = dt.get_config(model)
    if cfg.bias == "none":
        return set()
    copies = cfg.modules_to_save or []
    hosts = {n for n, m in model.named_modules()
             if "default" in getattr(m, "adapters", {}) and not any(n.endswith(c) for c in copies)}
    return {n for n in base_names if n.rsplit(".", 1)[-1] == "bias"
            and (cfg.bias == "all" or n.rpartition(".")[0] in hosts)}


@dataclass(frozen=True)
class Row:
    method: str
    kind: str  # a key of conftest.MAKERS
    variant: str
    config: Callable[[], dt.AdapterConfig]
    adapter_tensors: str  # regex every new parameter's name matches (where the method keeps them)
    init: str = "close"  # "exact" | "close" | "moves": a fresh adapter vs the base output
    train_std: float = 0.02  # emulated training noise
    merge_refusal: Optional[str] = None  # None: mergeable; else a regex of merge's ValueError
    merge_changes: tuple = ()  # suffixes that must be among the base tensors merge changes
    rewrites_base: bool = False  # init writes base weights (PiSSA/OLoRA): re-inject after a base load
    trained_base: Callable = no_base_tensors  # (model, base names) -> base tensors trained
    has_params: tuple = ()  # suffixes some adapter tensor must have
    reload_same_tensors: bool = True  # False: the file keeps an encoder's output, not its tensors
    no_match: str = "match nothing in the model"  # regex of the no-match load error
    bad_shape: str = "shape mismatch"  # regex of the wrong-shape load error
    marks: tuple = field(default=())  # pytest marks, e.g. xfail(strict=True, reason=...) for a known bug

    @property
    def id(self):
        return f"{self.method}-{self.kind}-{self.variant}"

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


# ----------------------------------------------------------------------------- LoRA / rsLoRA / DoRA
# the variant table (conftest.LORA_VARIANTS) is shared with test_lora_invariants.py
LORA = [Row("lora", k, v, partial(lora_config, k, v), r"\.adapters\.default\.", trained_base=lora_trained_biases,
            init="moves" if v == "init_false" else "close", rewrites_base=v in ("init_pissa", "init_olora"))
        for v in LORA_VARIANTS for k in LORA_TARGETS if LORA_VARIANTS[v](k) is not None]

# ----------------------------------------------------------------------------- (IA)3
IA3 = dict(method="ia3", init="exact", train_std=0.3, adapter_tensors=r"\.adapters\.default\.ia3_l$")
IA3_ROWS = [
    Row(kind="TL", variant="default", config=dt.IA3Config, **IA3),
    Row(kind="TGb", variant="default", config=dt.IA3Config, merge_changes=("bias",), **IA3),
    Row(kind="PF", variant="fc_conv", merge_changes=("bias",), **IA3,
        config=lambda: dt.IA3Config(target_modules=["fc1", "fc2", "conv", "gconv"],
                                    feedforward_modules=["fc2", "gconv"])),
]

# ----------------------------------------------------------------------------- bottleneck adapters
BOTTLENECK = dict(method="bottleneck", init="exact", adapter_tensors=r"\.adapters\.default\.",
                  merge_refusal=r"cannot be merged: .*non-linearity .* cannot be folded into any weight")


def bottleneck_config(kind, style, **kw):
    if kind == "PR":
        kw.update(target_modules=["ffn"] if style != "parallel" else ["ffn", "proj"], original_ln_before=False)
    return lambda: dt.BottleneckConfig(style=style, **kw)


BOTTLENECK_ROWS = [Row(kind=k, variant=s, config=bottleneck_config(k, s), **BOTTLENECK)
                   for k in ("TL", "TG", "PR") for s in ("houlsby", "pfeiffer", "parallel")] + [
    Row(kind=k, variant=f"{s}_learned", config=bottleneck_config(k, s, scaling="learned"),
        has_params=("adapters.default.scaling",), **BOTTLENECK)
    for k in ("TL", "TG", "PR") for s in ("houlsby", "pfeiffer", "parallel")]

# ----------------------------------------------------------------------------- prompt methods, LLaMA-Adapter
PROMPT = dict(method="prompt", init="moves", adapter_tensors=r"^prompt_adapters\.default\.",
              no_match="has no 'prompt_embeddings' tensor", bad_shape="prompt_embeddings has shape",
              merge_refusal=r"cannot be merged: its virtual tokens are extra inputs, not a change of any weight")
PROMPT_CONFIGS = {  # variant -> (config, the file holds an encoder's output)
    "prompt_tuning": (lambda: dt.PromptTuningConfig(num_virtual_tokens=8), False),
    "ptuning_mlp": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=16), True),
    "ptuning_lstm": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=16,
                                                    encoder_reparameterization_type="LSTM"), True),
    "prefix": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=8), False),
    "prefix_proj": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=8, prefix_projection=True,
                                                  encoder_hidden_size=24), True),
}
PROMPT_ROWS = [Row(kind=k, variant=v, config=c, reload_same_tensors=not enc, **PROMPT)
               for v, (c, enc) in PROMPT_CONFIGS.items() for k in ("TL", "TG")]
LLAMA_ADAPTER_ROWS = [
    Row("llama_adapter", k, "len4_layers2", lambda: dt.AdaptionPromptConfig(adapter_len=4, adapter_layers=2),
        init="exact", train_std=0.3, adapter_tensors=r"\.adapters\.default\.adaption_(prompt|gate)$",
        merge_refusal=r"cannot be merged: LLaMA-Adapter .* no weight delta")
    for k in ("TL", "TG")]

# ----------------------------------------------------------------------------- LoHa, LoKr (weight deltas)
LYC_TARGETS = {"TL": ["q_proj", "v_proj", "down_proj"], "TG": ["c_attn", "c_proj", "c_fc"],
               "PM": ["conv1", "conv2", "lin"], "PF": ["fc1", "conv", "gconv"]}
LOHA = dict(method="loha", init="exact", adapter_tensors=r"\.adapters\.default\.hada_(w[12]_[ab]|t[12])$")
LOHA_ROWS = [Row(kind=k, variant="default", config=partial(dt.LoHaConfig, r=4, alpha=8, target_modules=LYC_TARGETS[k]),
                 **LOHA) for k in LYC_TARGETS] + [
    Row(kind="PM", variant="effective_conv", has_params=("hada_t1", "hada_t2"), train_std=0.3, **LOHA,
        config=partial(dt.LoHaConfig, r=3, alpha=6, use_effective_conv2d=True, target_modules=["conv1", "conv2"])),
    Row(kind="TL", variant="patterns_rank_dropout", **LOHA,
        config=partial(dt.LoHaConfig, r=4, alpha=8, rank_dropout=0.3, target_modules=LYC_TARGETS["TL"],
                       rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})),
    Row(kind="TL", variant="init_false", **{**LOHA, "init": "moves"},
        config=partial(dt.LoHaConfig, r=4, alpha=8, init_weights=False, target_modules=LYC_TARGETS["TL"])),
]
LOKR = dict(method="lokr", init="exact", adapter_tensors=r"\.adapters\.default\.lokr_(w[12](_[ab])?|t2)$")
LOKR_ROWS = [Row(kind=k, variant="default", config=partial(dt.LoKrConfig, r=4, alpha=8, target_modules=LYC_TARGETS[k]),
                 **LOKR) for k in LYC_TARGETS] + [
    Row(kind="TL", variant="decompose_both_r2", has_params=("lokr_w1_a", "lokr_w2_b"), **LOKR,
        config=partial(dt.LoKrConfig, r=2, alpha=8, decompose_both=True, target_modules=LYC_TARGETS["TL"])),
    Row(kind="PM", variant="effective_conv", has_params=("lokr_t2",), **LOKR,
        config=partial(dt.LoKrConfig, r=1, alpha=2, use_effective_conv2d=True, target_modules=["conv1", "conv2"])),
    Row(kind="TL", variant="init_lycoris_factor4", **LOKR,
        config=partial(dt.LoKrConfig, r=4, alpha=8, init_weights="lycoris", decompose_factor=4,
                       target_modules=LYC_TARGETS["TL"])),
]

# ----------------------------------------------------------------------------- VeRA (shared projections)
VERA = dict(method="vera", init="exact", train_std=0.3, adapter_tensors=r"\.adapters\.default\.vera_lambda_[bd]$",
            no_match=r"match nothing in the model|has no 'base_model\.vera_A'")
VERA_ROWS = [
    Row(kind="TL", variant="default", config=partial(dt.VeraConfig, r=16, target_modules=LYC_TARGETS["TL"]), **VERA),
    Row(kind="TG", variant="default", config=partial(dt.VeraConfig, r=16, target_modules=LYC_TARGETS["TG"]), **VERA),
    Row(kind="TL", variant="no_projection_key7", **VERA, config=partial(
        dt.VeraConfig, r=8, save_projection=False, projection_prng_key=7, target_modules=LYC_TARGETS["TL"])),
    Row(kind="TGb", variant="bias_vera_only", trained_base=lora_trained_biases, **VERA,
        config=partial(dt.VeraConfig, r=8, bias="vera_only", target_modules=["c_attn", "c_fc"])),
]

# ----------------------------------------------------------------------------- AdaLoRA (SVD form)
ADA = dict(method="adalora", init="exact", train_std=0.1, adapter_tensors=r"\.adapters\.default\.lora_[ABE]$")
ADA_TARGETS = {"TL": ["q_proj", "v_proj", "down_proj"], "TG": ["c_attn", "c_proj"], "PM": ["conv2", "lin"]}
ADA_ROWS = [Row(kind=k, variant="default", **ADA, config=partial(
    dt.AdaLoraConfig, init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=ADA_TARGETS[k]))
    for k in ADA_TARGETS] + [
    Row(kind="TL", variant="rank_pattern", **ADA, config=partial(  # as a trained adapter's file carries it
        dt.AdaLoraConfig, init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], rank_pattern={
            "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
            "model.layers.1.self_attn.v_proj.lora_E": [False, False, False, True]})),
    Row(kind="TL", variant="init_false", **{**ADA, "init": "moves", "train_std": 0.02}, config=partial(
        dt.AdaLoraConfig, init_r=4, total_step=10, init_lora_weights=False, target_modules=["q_proj", "v_proj"])),
]

# ----------------------------------------------------------------------------- OFT, BOFT (rotations)
OFT = dict(method="oft", init="exact", train_std=0.1, adapter_tensors=r"\.adapters\.default\.oft_(embedding_)?R\.weight$")
OFT_ROWS = [
    Row(kind="TL", variant="default", config=partial(dt.OFTConfig, oft_block_size=8, target_modules=LYC_TARGETS["TL"]),
        **OFT),
    Row(kind="TL", variant="embedding_exact_cayley", **OFT, config=partial(
        dt.OFTConfig, oft_block_size=0, r=4, use_cayley_neumann=False, target_modules=["embed_tokens", "q_proj"])),
    Row(kind="TL", variant="coft_block_share", **OFT, config=partial(
        dt.OFTConfig, oft_block_size=8, coft=True, eps=1e-2, block_share=True, target_modules=["q_proj", "o_proj"])),
    Row(kind="TG", variant="conv1d_and_wte", **OFT, config=partial(
        dt.OFTConfig, oft_block_size=8, target_modules=["c_attn", "c_fc", "wte"])),
    Row(kind="PC", variant="conv1x1", **OFT, config=partial(dt.OFTConfig, oft_block_size=4,
                                                            target_modules=["conv_in", "conv_out"])),
    Row(kind="TL", variant="init_false", **{**OFT, "init": "moves"}, config=partial(
        dt.OFTConfig, oft_block_size=8, init_weights=False, target_modules=LYC_TARGETS["TL"])),
]
BOFT = dict(method="boft", train_std=0.1, adapter_tensors=r"\.adapters\.default\.boft_[Rs]$")
BOFT_ROWS = [
    Row(kind="TL", variant="default", config=partial(dt.BOFTConfig, boft_block_size=8, target_modules=LYC_TARGETS["TL"]),
        **BOFT),
    Row(kind="TL", variant="butterfly2", **BOFT, config=partial(
        dt.BOFTConfig, boft_block_size=4, boft_n_butterfly_factor=2, target_modules=LYC_TARGETS["TL"])),
    Row(kind="TG", variant="conv1d", **BOFT, config=partial(dt.BOFTConfig, boft_block_num=4, boft_block_size=0,
                                                          target_modules=LYC_TARGETS["TG"])),
    Row(kind="TGb", variant="bias_boft_only", trained_base=lora_trained_biases, **BOFT,
        config=partial(dt.BOFTConfig, boft_block_size=8, bias="boft_only", target_modules=["c_attn", "c_fc"])),
    Row(kind="PC", variant="conv", **BOFT, config=partial(dt.BOFTConfig, boft_block_size=4,
                                                        target_modules=["conv_in", "conv3"])),
    Row(kind="TL", variant="init_false", **{**BOFT, "init": "moves"}, config=partial(
        dt.BOFTConfig, boft_block_size=8, init_weights=False, target_modules=LYC_TARGETS["TL"])),
]

ROWS = (LORA + IA3_ROWS + BOTTLENECK_ROWS + PROMPT_ROWS + LLAMA_ADAPTER_ROWS + LOHA_ROWS + LOKR_ROWS + VERA_ROWS
        + ADA_ROWS + OFT_ROWS + BOFT_ROWS)


# ----------------------------------------------------------------------------- helpers
LM_KINDS = {"TL", "TG", "TGb"}
LM_IDS = [X_IDS[0], [0, 0] + X_IDS[0][:4]]  # X and a left-padded row
LM_MASK = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])


def out(model, kind):
    with torch.no_grad():
        if kind in LM_KINDS:
            return run(model, kind, ids=LM_IDS, attention_mask=LM_MASK)
        return run(model, kind)


def loss(model, kind):
    """A training loss: the causal LMs' own loss in train mode (labels = ids, padding ignored), a random
    projection of the output for the plain models."""
    if kind not in LM_KINDS:
        y = run(model, kind)
        return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum()
    ids = torch.tensor(LM_IDS)
    model.train()
    try:
        return model(input_ids=ids, attention_mask=LM_MASK, labels=ids.masked_fill(LM_MASK == 0, -100)).loss
    finally:
        model.eval()


def generated(model, kind):
    if kind not in LM_KINDS:
        return None
    with torch.no_grad():
        return model.generate(torch.tensor(LM_IDS), attention_mask=LM_MASK, max_new_tokens=4, do_sample=False,
                              eos_token_id=None, pad_token_id=0)


def snapshot(model, keys):
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def assert_same_tensors(model, snap, what):
    sd = model.state_dict()
    for k, v in snap.items():
        assert torch.equal(sd[k], v), f"{what}: {k} differs"


def ties(model):
    """Groups of parameter names that share one tensor (GPT-2's wte / lm_head)."""
    by = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by.setdefault(id(p), []).append(n)
    return sorted(tuple(v) for v in by.values() if len(v) > 1)


def assert_plain(model, kind):
    """Nothing of deltatune is left: the module tree, hooks, forward and attributes of a fresh base."""
    assert dt.adapter_names(model) == []
    ref = dict(MAKERS[kind]().named_modules())
    got = dict(model.named_modules())
    assert list(got) == list(ref)
    for name, mod in got.items():
        r = ref[name]
        assert type(mod) is type(r), name
        assert len(mod._forward_hooks) == len(r._forward_hooks), f"forward hook left on {name!r}"
        assert len(mod._forward_pre_hooks) == len(r._forward_pre_hooks), f"pre-hook left on {name!r}"
        assert set(mod.__dict__) == set(r.__dict__), (name, set(mod.__dict__) ^ set(r.__dict__))


def write_adapter(dirpath, config_text, tensors):
    dirpath.mkdir()
    (dirpath / "adapter_config.json").write_text(config_text)
    save_file(tensors, str(dirpath / "adapter_model.safetensors"))
    return str(dirpath)


PREFIX = "base_model.model."  # PEFT's file keys: PREFIX + <module path>[.base_layer].<leaf>


def renamed(key):
    return PREFIX + "nothing." + key[len(PREFIX):] if key.startswith(PREFIX) else "nothing." + key


def model_name(key):
    """The model tensor a file key stands for when it holds a base tensor (a trained bias, a copy)."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


# ----------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("row", [r.param() for r in ROWS])
def test_invariants(row: Row, tmp_path):
    kind, make = row.kind, MAKERS[row.kind]
    model = make()
    base_names = [n for n, _ in model.named_parameters()]
    base_set = set(base_names)
    base_keys = list(model.state_dict())
    base_sd, base_ties = snapshot(model, base_keys), ties(model)
    L0, G0 = out(model, kind), generated(model, kind)

    # 1. same object, base names unchanged, a base checkpoint still loads
    cfg = row.config()
    assert dt.inject(model, cfg) is model
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n in base_set] == base_names
    new = {n for n in names if n not in base_set}
    missing, unexpected = model.load_state_dict(make().state_dict(), strict=False)
    assert unexpected == [] and not set(missing) & set(base_keys), (missing, unexpected)
    if row.rewrites_base:  # the base load just overwrote the residual weights the init wrote
        dt.delete_adapter(model, "default")
        dt.inject(model, cfg)
    assert all(p.grad is None for p in model.parameters())

    # 2. a fresh adapter computes the base output (where the method's init is the identity)
    L_init = out(model, kind)
    if row.init == "exact":
        assert torch.equal(L_init, L0)
    elif row.init == "close":
        assert rel_err(L_init, L0) <= 1e-5, rel_err(L_init, L0)
    else:
        assert rel_err(L_init, L0) > 1e-4

    # 3. only adapter tensors (and the base tensors the row trains) require grad; all get gradients
    want = new | row.trained_base(model, base_names)
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == want and got
    assert all(re.search(row.adapter_tensors, n) for n in new), sorted(new)
    for suffix in row.has_params:
        assert any(n.endswith(suffix) for n in new), suffix
    emulate_training(model, std=row.train_std)
    loss(model, kind).backward()
    for n, p in model.named_parameters():
        if n in want:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.norm() > 0, f"no gradient: {n}"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    model.zero_grad(set_to_none=True)

    # 4. trained: the output moves, so the checks below can fail
    L1 = out(model, kind)
    moved = min(rel_err(L1, L0), (L1 - L0).abs().max().item())
    assert moved > 1e-3, "training noise did not change the output: the checks below prove nothing"

    # 5. disabled == base exactly; enabled again == trained
    with dt.disable_adapter(model):
        assert torch.equal(out(model, kind), L0)
        G = generated(model, kind)
        assert G is None or torch.equal(G, G0)
    assert torch.equal(out(model, kind), L1)

    # 6. merged == unmerged and unmerge restores the base exactly, or merge is refused with a reason
    before = snapshot(model, base_keys)
    if row.merge_refusal is None:
        dt.merge(model, safe_merge=True)
        assert dt.merged_adapters(model) == ["default"]
        assert rel_err(out(model, kind), L1) <= 1e-5, rel_err(out(model, kind), L1)
        sd = model.state_dict()
        changed = [k for k in base_keys if not torch.equal(sd[k], before[k])]
        assert changed, "merge changed no base tensor"
        assert all(any(k.endswith(s) for k in changed) for s in row.merge_changes), changed
        with dt.disable_adapter(model):
            assert torch.equal(out(model, kind), L0)
        assert dt.merged_adapters(model) == ["default"]
        assert rel_err(out(model, kind), L1) <= 1e-5
        dt.unmerge(model)
        assert dt.merged_adapters(model) == []
        assert ties(model) == base_ties
    else:
        for fn in (dt.merge, dt.merge_and_unload):
            with pytest.raises(ValueError, match=row.merge_refusal):
                fn(model)
        assert dt.adapter_names(model) == ["default"] and dt.merged_adapters(model) == []
    assert_same_tensors(model, before, "after unmerge / a refused merge")
    assert torch.equal(out(model, kind), L1)

    # 7. save -> load into a fresh model: identical outputs, same config, frozen unless asked
    d = tmp_path / "a"
    dt.save_adapter(model, str(d))
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == cfg.peft_type
    fresh = dt.load_adapter(make(), str(d))
    assert torch.equal(out(fresh, kind), L1)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference by default
    saved, loaded = dt.get_config(model).to_dict(), dt.get_config(fresh).to_dict()
    for c in (saved, loaded):
        c.pop("base_model_name_or_path")  # filled in from the model's config when saving
    assert loaded == {**saved, "inference_mode": True}
    fresh2 = dt.load_adapter(make(), str(d), is_trainable=True)
    new2 = {n for n, _ in fresh2.named_parameters() if n not in base_set}
    got2 = {n for n, p in fresh2.named_parameters() if p.requires_grad}
    assert got2 and got2 == (want if row.reload_same_tensors else new2 | row.trained_base(fresh2, base_names))

    # 8. a file none of whose keys match, or with a wrong shape, is an error naming the key
    tensors, conf = load_file(str(d / "adapter_model.safetensors")), (d / "adapter_config.json").read_text()
    own = [k for k in sorted(tensors) if model_name(k) not in base_set]  # not a copy of a base tensor
    key = (own or sorted(tensors))[0]
    bad = {renamed(k): v for k, v in tensors.items()}
    wrong = {**tensors, key: torch.zeros(*(s + 1 for s in tensors[key].shape))}
    for what, files, msg, named in [("nomatch", bad, row.no_match, min(bad)),
                                    ("shape", wrong, row.bad_shape, key)]:
        target = make()
        with pytest.raises(ValueError, match=msg) as err:
            dt.load_adapter(target, write_adapter(tmp_path / what, conf, files))
        assert named in str(err.value)
        assert_plain(target, kind)  # nothing left behind
        assert torch.equal(out(target, kind), L0)

    # 9. deleting the adapter gives back the base model
    dt.delete_adapter(model, "default")
    assert torch.equal(out(model, kind), L0)
    assert list(model.state_dict()) == base_keys
    assert_same_tensors(model, base_sd, "after delete_adapter")
    assert ties(model) == base_ties
    assert_plain(model, kind)
