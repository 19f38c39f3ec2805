"""The core's bookkeeping as contracts, each over its whole class (every method, layer kind and order):

* merging any stack of mergeable adapters, in any active order, all at once or one by one, equals the
  unmerged forward (merge, merge_and_unload, and ``deltatune merge``);
* an adapter that changes base tensors in place (PiSSA/OLoRA residuals, trained biases) changes
  nothing while it is inactive; two of them on one tensor cannot be active together;
* ``rank_pattern`` / ``alpha_pattern`` keys that match nothing are errors;
* ``layers_to_transform`` counts layers of the model's layer list, not a deeper numbered list;
* weight decay never moves a tensor whose neutral value is not 0;
* every method runs under CPU bf16 autocast, with and without grad, in train and eval mode;
* the state holds only declared fields, and the routing decision is one function.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import emulate_training, make_pm, make_tg, make_tl, make_tt, rel_err, run
from deltatune.adapters import AdapterRecord, AdapterState, get_state


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- merge stacks

# per model kind: the layers every method targets (so that stacks share layers), and the one (IA)3
# scales at its input (a feed-forward target)
STACK_TARGETS = {"TL": (["v_proj", "down_proj"], ["down_proj"]),
                 "TG": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                 "PM": (["conv1", "lin"], ["lin"])}
EMBED = {"TL": "embed_tokens", "TG": "wte", "PM": "emb"}


def stack_config(kind, method):
    tm, ff = STACK_TARGETS[kind]
    if method == "lora":
        return dt.LoraConfig(r=4, lora_alpha=8, target_modules=tm)
    if method == "rslora":
        return dt.LoraConfig(r=4, lora_alpha=8, target_modules=tm, use_rslora=True)
    if method == "dora":
        return dt.LoraConfig(r=4, lora_alpha=8, target_modules=tm + [EMBED[kind]], use_dora=True)
    if method == "lora_emb":
        return dt.LoraConfig(r=2, lora_alpha=4, target_modules=[EMBED[kind]] + tm[:1])
    if method == "lora_bias":
        return dt.LoraConfig(r=2, lora_alpha=4, target_modules=tm, lora_bias=True)
    if method == "ia3_out":
        return dt.IA3Config(target_modules=tm, feedforward_modules=[])
    if method == "ia3_ff":
        return dt.IA3Config(target_modules=tm, feedforward_modules=ff)
    raise KeyError(method)


STACK_METHODS = ["lora", "rslora", "dora", "lora_emb", "lora_bias", "ia3_out", "ia3_ff"]
STACKS = [(k, a, b) for k in STACK_TARGETS for a, b in itertools.product(STACK_METHODS, repeat=2)
          if not (k == "TL" and "lora_bias" in (a, b))]  # TL's layers have no bias for lora_bias to merge into


def _stacked(kind, a, b, active):
    model = {"TL": make_tl, "TG": make_tg, "PM": make_pm}[kind]()
    dt.inject(model, stack_config(kind, a), "a")
    dt.inject(model, stack_config(kind, b), "b")
    dt.set_adapter(model, active)
    emulate_training(model, std=0.05)
    return model


@pytest.mark.parametrize("kind,a,b", STACKS, ids=[f"{k}-{a}+{b}" for k, a, b in STACKS])
def test_merging_any_stack_in_any_order_equals_the_unmerged_forward(kind, a, b):
    """Merging the whole active stack (merge, merge_and_unload) always equals the unmerged forward.
    A merge or unmerge of part of it either equals it too, or is refused (a layer where a merged
    (IA)3 scaling would follow an unmerged adapter cannot compute the forward) and changes nothing."""
    for active in (["a", "b"], ["b", "a"]):
        model = _stacked(kind, a, b, active)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
        with torch.no_grad():
            L = run(model, kind)
            dt.merge(model)
            assert rel_err(run(model, kind), L) <= 1e-5, ("merge", active)
            dt.unmerge(model)
            assert torch.equal(run(model, kind), L)
            for first, second in ((["a"], ["b"]), (["b"], ["a"])):  # one by one, both sequences
                for step in (lambda: dt.merge(model, first), lambda: dt.merge(model, second),
                             lambda: dt.unmerge(model, first), lambda: dt.unmerge(model, second)):
                    merged = dt.merged_adapters(model)
                    try:
                        step()
                    except ValueError as e:
                        assert "cannot merge only part of the adapters" in str(e)
                        assert dt.merged_adapters(model) == merged  # refused: nothing changed
                    assert rel_err(run(model, kind), L) <= 1e-5, (active, first, dt.merged_adapters(model))
                dt.unmerge(model)
            for n, p in model.named_parameters():
                if n in base:
                    assert torch.equal(p, base[n]), n  # unmerge restores every base tensor bit for bit
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tied embeddings get their own copy (warned)
                dt.merge_and_unload(model)
            assert rel_err(run(model, kind), L) <= 1e-5, ("merge_and_unload", active)


# the same through the command line: `deltatune merge` of one adapter of each mergeable method
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-cli")
    make_tl().save_pretrained(root / "tl")
    make_tt().save_pretrained(root / "tl")
    return root


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "lora_emb", "ia3_out", "ia3_ff"])
def test_deltatune_merge_equals_the_adapter_model(method, tiny_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    model = AutoModelForCausalLM.from_pretrained(tiny_folder / "tl").eval()
    dt.inject(model, stack_config("TL", method))
    emulate_training(model, std=0.05)
    ids = torch.tensor([[5, 17, 42, 9, 63, 2]])
    with torch.no_grad():
        L = model(ids).logits
    dt.save_adapter(model, str(tmp_path / "a"))
    assert main(["merge", "--adapter", str(tmp_path / "a"), "--model", str(tiny_folder / "tl"),
                 "--out", str(tmp_path / "m"), "--threads", "1"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert rel_err(merged(ids).logits, L) <= 1e-5


# ----------------------------------------------------------------------------- base tensors changed in place

REWRITERS = {
    "pissa": lambda tm: dt.LoraConfig(r=2, lora_alpha=4, target_modules=tm, init_lora_weights="pissa"),
    "olora": lambda tm: dt.LoraConfig(r=2, lora_alpha=4, target_modules=tm, init_lora_weights="olora"),
    "bias_all": lambda tm: dt.LoraConfig(r=2, lora_alpha=4, target_modules=tm, bias="all"),
}
LINEAR_TARGETS = {"TL": ["q_proj", "v_proj"], "TG": ["c_attn"], "PM": ["lin"]}
REWRITE_CASES = [(k, m, first) for k in LINEAR_TARGETS for m in REWRITERS for first in (True, False)
                 if not (k == "TL" and m == "bias_all")]  # TL has no biases


@pytest.mark.parametrize("kind,method,rewriter_first", REWRITE_CASES,
                         ids=[f"{k}-{m}-{'rewriter first' if f else 'plain first'}" for k, m, f in REWRITE_CASES])
def test_an_inactive_adapter_that_rewrites_base_tensors_changes_nothing(kind, method, rewriter_first):
    make = {"TL": make_tl, "TG": make_tg, "PM": make_pm}[kind]
    model = make()
    with torch.no_grad():
        L0 = run(model, kind)
    tm = LINEAR_TARGETS[kind]
    plain = dt.LoraConfig(r=2, lora_alpha=4, target_modules=tm)  # zero-init B: computes the base
    order = [("w", REWRITERS[method](tm)), ("p", plain)]
    for name, cfg in (order if rewriter_first else order[::-1]):
        dt.inject(model, cfg, name)
        if name == "w":
            dt.set_adapter(model, "w")
            emulate_training(model, std=0.05)  # its residual/biases and A, B now its own
            with torch.no_grad():
                Lw = run(model, kind)
    with torch.no_grad():
        dt.set_adapter(model, "p")
        assert torch.equal(run(model, kind), L0)  # the fresh plain adapter sees the original base
        with dt.disable_adapter(model):
            assert torch.equal(run(model, kind), L0)
        dt.set_adapter(model, "w")
        assert torch.equal(run(model, kind), Lw)  # the rewriter alone, as before the other was loaded
        dt.set_adapter(model, ["w", "p"])
        assert rel_err(run(model, kind), Lw) <= 1e-6  # p adds zero
        dt.merge(model)  # both merged; then w leaves: p stays merged over the original weights
        with pytest.warns(UserWarning, match="unmerging"):
            dt.set_adapter(model, "p")
        assert dt.merged_adapters(model) == ["p"]
        assert rel_err(run(model, kind), L0) <= 1e-6
        dt.delete_adapter(model, "p")
        dt.set_adapter(model, "w")
        assert torch.equal(run(model, kind), Lw)
        dt.delete_adapter(model, "w")
        assert torch.equal(run(model, kind), L0)


@pytest.mark.parametrize("method", list(REWRITERS))
def test_two_adapters_rewriting_one_tensor_cannot_act_together(method):
    model = make_tg()
    dt.inject(model, REWRITERS[method](["c_attn"]), "w1")
    dt.inject(model, REWRITERS[method](["c_attn"]), "w2")
    with pytest.raises(ValueError, match=r"'w1' and 'w2' both change the base tensor .* activate one of them"):
        dt.set_adapter(model, ["w1", "w2"])
    assert dt.active_adapters(model) == ["w1"]


def test_saved_rewriter_loads_beside_another_adapter_and_computes_alone(tmp_path):
    model = make_tg()
    dt.inject(model, REWRITERS["pissa"](["c_attn"]), "w")
    emulate_training(model, std=0.05)
    with torch.no_grad():
        Lw = run(model, "TG")
    dt.save_adapter(model, str(tmp_path / "w"))
    other = make_tg()
    dt.inject(other, dt.LoraConfig(r=2, target_modules=["c_attn"], bias="all"), "first")
    emulate_training(other, std=0.05)
    with torch.no_grad():
        Lf = run(other, "TG")
    dt.load_adapter(other, str(tmp_path / "w"), "w")
    with torch.no_grad():
        assert torch.equal(run(other, "TG"), Lf)  # loading it (inactive) changed nothing
        dt.set_adapter(other, "w")
        assert rel_err(run(other, "TG"), Lw) <= 1e-6


# ----------------------------------------------------------------------------- patterns and layers


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_keys_that_match_nothing_are_errors(field):
    model = make_tl()
    with pytest.raises(ValueError, match=rf"{field} keys \['q_prj'\] match no adapted module.*nearest.*q_proj"):
        dt.inject(model, dt.LoraConfig(target_modules=["q_proj", "v_proj"], **{field: {"q_prj": 2}}))
    assert get_state(model) is None and not any(p.requires_grad is False for p in model.parameters())
    dt.inject(model, dt.LoraConfig(target_modules=["q_proj", "v_proj"], **{field: {r"layers\.1\.self_attn\.q_proj": 2}}))


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(8, 8)

    def forward(self, x):
        return self.w1(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([Expert() for _ in range(4)])
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(sum(e(x) for e in self.experts))


class RootLayers(nn.Module):
    """Layers at the model root, each with a numbered list of experts (mixture-of-experts)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


@pytest.mark.parametrize("pattern", [None, "layers"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["root", "nested"])
def test_layer_index_comes_from_the_layer_list_not_a_deeper_numbered_list(pattern, wrapped):
    torch.manual_seed(0)
    model = RootLayers() if not wrapped else nn.Sequential()
    if wrapped:  # the layer list one level down, as in transformers models (model.layers)
        model = nn.Module()
        model.model = RootLayers()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["w1", "proj"], layers_to_transform=[1],
                                   layers_pattern=pattern))
    prefix = "model." if wrapped else ""
    assert sorted(dt.get_record(model).hosts) == sorted(
        [f"{prefix}layers.1.experts.{e}.w1" for e in range(4)] + [f"{prefix}layers.1.proj"])


# ----------------------------------------------------------------------------- weight decay

DECAY_CASES = {
    "lora": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "dora": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "dora-embedding": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True)),
    "ia3": lambda: (make_tl(), dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "modules_to_save": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "bias_all": lambda: (make_tg(), dt.LoraConfig(r=4, target_modules=["c_attn"], bias="all", lora_bias=True)),
    "bottleneck-learned": lambda: (make_tl(), dt.BottleneckConfig(style="pfeiffer", scaling="learned")),
    "bottleneck-channel": lambda: (make_tl(), dt.BottleneckConfig(style="houlsby", scaling="channel")),
    "llama-adapter": lambda: (make_tl(), dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=1)),
}


@pytest.mark.parametrize("case", list(DECAY_CASES))
def test_weight_decay_only_pulls_tensors_whose_neutral_value_is_zero(case):
    from deltatune.train.loop import Trainer

    model, cfg = DECAY_CASES[case]()
    dt.inject(model, cfg)
    with torch.no_grad():
        L = run(model, "TG" if "bias" in case else "TL")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr = Trainer(model, [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}], weight_decay=0.1, lr=1e-2)
    decay, keep = dt.parameter_groups(model)
    for _ in range(200):  # zero gradients: only weight decay moves anything
        for p in tr.params:
            p.grad = torch.zeros_like(p)
        tr.optimizer.step()
    names = {id(p): n for n, p in model.named_parameters()}
    for p in keep:
        assert torch.equal(p, before[names[id(p)]]), names[id(p)]
    for p in decay:
        if before[names[id(p)]].abs().sum() > 0:
            assert p.abs().sum() < before[names[id(p)]].abs().sum(), names[id(p)]  # decay is on for these
    with torch.no_grad():
        assert rel_err(run(model, "TG" if "bias" in case else "TL"), L) <= 1e-6


def test_decay_groups_name_the_neutral_tensors():
    model = make_tg()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, bias="all",
                                   modules_to_save=["ln_f"]))
    decay, keep = dt.parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in map(names.get, map(id, decay)))
    kept = set(map(names.get, map(id, keep)))
    assert any(n.endswith("lora_magnitude_vector") for n in kept)
    assert "transformer.h.0.ln_1.bias" in kept and "transformer.ln_f.adapters.default.weight" in kept


# ----------------------------------------------------------------------------- autocast

AUTOCAST = {
    "lora": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules="all-linear")),
    "lora-embedding": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
    "dora": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                              use_dora=True)),
    "lora-conv1d": lambda: (make_tg(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # train mode: no base dropout
                            dt.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True)),
    "ia3": lambda: (make_tl(), dt.IA3Config()),
    "bottleneck": lambda: (make_tl(), dt.BottleneckConfig(style="houlsby")),
    "bottleneck-parallel": lambda: (make_tl(), dt.BottleneckConfig(style="parallel")),
    "modules_to_save": lambda: (make_tl(), dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "prompt-tuning": lambda: (make_tl(), dt.PromptTuningConfig(num_virtual_tokens=3)),
    "p-tuning": lambda: (make_tl(), dt.PromptEncoderConfig(num_virtual_tokens=3)),
    "prefix-tuning": lambda: (make_tl(), dt.PrefixTuningConfig(num_virtual_tokens=3)),
    "llama-adapter": lambda: (make_tl(), dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2)),
}


@pytest.mark.parametrize("case", list(AUTOCAST))
def test_every_method_runs_under_cpu_bf16_autocast(case):
    model, cfg = AUTOCAST[case]()
    dt.inject(model, cfg)
    emulate_training(model, std=0.05)
    ids = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 8, 9, 10, 11, 12]])
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            ref = model(ids).logits.float()
        for grad in (False, True):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids).logits
            assert out.dtype in (torch.bfloat16, torch.float32)
            assert rel_err(out.float(), ref) <= 3e-2, (train, grad)
            if grad:
                out.float().sum().backward()
                assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
                model.zero_grad(set_to_none=True)


# every kind of output-side contribution: added (LoRA family, bottleneck), scaled (IA3, DoRA), rotated (BOFT).
# Input-side adapters (OFT, feed-forward IA3) change the host's input, which its own bf16 matmul then rounds: their
# precision is autocast's (README, Fast training).
SMALL_UPDATE = {
    "lora": dt.LoraConfig(r=4, target_modules=["k_proj", "down_proj", "embed_tokens"]),  # linear and embedding
    "dora": dt.LoraConfig(r=4, target_modules=["k_proj", "down_proj"], use_dora=True),
    "loha": dt.LoHaConfig(r=4, target_modules=["k_proj", "down_proj"]),
    "lokr": dt.LoKrConfig(r=4, target_modules=["k_proj", "down_proj"]),
    "vera": dt.VeraConfig(r=4, target_modules=["down_proj"]),
    "adalora": dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=["k_proj", "down_proj"], total_step=10),
    "ia3": dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=[]),
    "boft": dt.BOFTConfig(boft_block_size=4, target_modules=["k_proj", "down_proj"]),
    "bottleneck": dt.BottleneckConfig(style="parallel"),
}


@pytest.mark.parametrize("case", list(SMALL_UPDATE))
def test_a_small_update_survives_bf16_autocast(case):
    """Under bf16 autocast on a bf16 base, an adapter's contribution of ~1e-4 of the output (a first
    training step's) reaches the host's output as in float32: the sum is float32, not rounded back
    onto the bf16 output it was added to (bf16 spacing at 1.0 is 2^-7, so the update vanished)."""
    model = make_tl(intermediate_size=96).to(torch.bfloat16)
    dt.inject(model, SMALL_UPDATE[case])
    emulate_training(model, std=1e-4)
    hosts = [m for m in model.modules() if "adapters" in m._modules]
    assert hosts
    g = torch.Generator().manual_seed(3)
    for host in hosts:
        if isinstance(host, nn.Embedding):
            x = torch.randint(0, host.num_embeddings, (3, 5), generator=g)
        else:
            width = getattr(host, "in_features", model.config.hidden_size)  # bottleneck: on the MLP block
            x = torch.randn(3, 5, width, generator=g).to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            on = host(x)
            with dt.disable_adapter(model):
                off = host(x)
        twin, wide = _float_copy(model, host)
        with torch.no_grad():
            xf = x if not x.is_floating_point() else x.float()
            ref_on = wide(xf)
            with dt.disable_adapter(twin):
                ref_off = wide(xf)
        d, ref = (on.float() - off.float()).flatten(), (ref_on - ref_off).flatten()
        assert on.dtype == torch.float32 and ref.abs().max() > 0
        cos = float(torch.nn.functional.cosine_similarity(d, ref, dim=0))
        assert cos > 0.98 and abs(float(d.norm() / ref.norm()) - 1) < 0.05, (case, cos)


def _float_copy(model, host):
    """A float32 copy of ``model`` (same adapters, base weights the bf16 values) and its ``host``."""
    import copy

    twin = copy.deepcopy(model).float()
    path = next(n for n, m in model.named_modules() if m is host)
    return twin, twin.get_submodule(path)


def test_hosts_reading_one_float32_input_share_its_cast():
    """q, k and v read one widened (float32) input under autocast: it is cast to bf16 once, and
    the outputs are those of autocast's own casts."""
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    emulate_training(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 4, 32, requires_grad=True)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    for h in hooks:
        h.remove()
    assert [t.dtype for t in seen] == [torch.bfloat16] * 3 and seen[0] is seen[1] is seen[2]
    with dt.disable_adapter(model), torch.autocast("cpu", dtype=torch.bfloat16):
        # the base part: what autocast computes from the float32 input by itself
        base = [torch.nn.functional.linear(x, m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    with dt.disable_adapter(model), torch.autocast("cpu", dtype=torch.bfloat16):
        again = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert all(torch.equal(a, b) for a, b in zip(again, base))
    sum(o.float().sum() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_widened_hosts_run_under_inference_mode():
    """Inference-mode tensors keep no version counter: the shared cast is made without its cache."""
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear"))
    emulate_training(model)
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids).logits
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids).logits
    assert torch.equal(got, ref)


def test_modules_to_save_on_a_block_with_its_own_forward():
    """A block whose forward a fast-path setting replaced (SwiGLU) still runs its trained copy, and
    gets that forward back when the copy goes."""
    from deltatune.integrations.hf_mlp import use_fused_swiglu

    model = make_tl()
    assert use_fused_swiglu(model)
    mlp = model.model.layers[0].mlp
    own = mlp.__dict__["forward"]
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.layers.0.mlp"]))
    emulate_training(model, std=0.5)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        trained = mlp(x)
        with dt.disable_adapter(model):
            base = mlp(x)
    assert not torch.allclose(trained, base)
    dt.delete_adapter(model, "default")
    assert mlp.__dict__["forward"] == own


# ----------------------------------------------------------------------------- declared state, one routing point


def test_state_holds_only_declared_fields():
    model = make_tg()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["c_attn"], bias="all", init_lora_weights="pissa",
                                   modules_to_save=["ln_f"]), "a")
    dt.inject(model, dt.IA3Config(), "b")
    dt.inject(model, dt.BottleneckConfig(style="pfeiffer"), "c")
    dt.inject(model, dt.PromptTuningConfig(num_virtual_tokens=2), "d")
    st = get_state(model)
    declared = {f.name for f in dataclasses.fields(AdapterState)}
    assert set(vars(st)) == declared
    for rec in st.records.values():
        assert isinstance(rec, AdapterRecord) and set(vars(rec)) == {f.name for f in dataclasses.fields(AdapterRecord)}
    assert set(st.model_hooks) == {"adapter_names", "checkpointing", "prompt", "save_pretrained", "contiguous_head"}
    for name, mod in model.named_modules():  # hosts carry the state mark and nothing else of ours
        ours = [k for k in vars(mod) if k.startswith("_deltatune")]
        assert ours in ([], ["_deltatune_state"]), (name, ours)


def test_the_routing_decision_is_one_function():
    """Every hook of the core asks ``adapters.acting`` (or ``acting_names``): no other code reads
    ``state.active`` / ``state.disabled`` to decide what runs."""
    import ast
    import pathlib

    import deltatune

    root = pathlib.Path(deltatune.__file__).parent
    readers = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr == "disabled" and isinstance(node.ctx, ast.Load):
                    readers.add(f"{path.relative_to(root)}:{fn.name}")
    # disabled is read by the routing rule, by sync_base_tensors (which tensors the base holds) and
    # by disable_adapter itself (to restore the previous flag)
    assert readers == {"routing.py:acting_names", "inject.py:sync_base_tensors", "lifecycle.py:disable_adapter"}


@pytest.mark.parametrize("shape", [(6, 16), (2, 5, 16)])
@pytest.mark.parametrize("names", [["a"], ["a", "b"]])
def test_lora_under_bf16_autocast_adds_and_trains_as_in_float32(shape, names):
    """Under bf16 autocast on a bf16 base, LoRA's update is added to the float32-widened host output
    (by the first adapter itself, the others in place into that copy): the output is the base's
    bf16 output plus every update in float32, and the gradients of x, A and B are the float32
    ones within bf16's rounding of the gradient (2^-8 relative)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24, bias=False)).to(torch.bfloat16)
    for n in names:
        dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name=n)
    dt.set_adapter(model, names)
    params = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for k, p in params.items():
            p.normal_(0, 0.3 if "lora_A" in k else 1e-3)  # an early update: far below the output's bf16 spacing
    x = torch.randn(*shape).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    # the float64 reference from the same (bf16-rounded where autocast rounds) inputs
    ref_p = {k: p.detach().double().requires_grad_() for k, p in params.items()}
    xr = x.detach().double().requires_grad_()
    w0 = model[0].weight.double()
    ref = base = (xr @ w0.T).to(torch.bfloat16).double()  # the base output autocast computes
    for n in names:
        a, b = ref_p[f"0.adapters.{n}.lora_A.weight"], ref_p[f"0.adapters.{n}.lora_B.weight"]
        ref = ref + 2.0 * (xr @ a.T) @ b.T
    (ref * g.double()).sum().backward()
    assert y.dtype == torch.float32
    # the first adapter widened the output itself; a second one added into that copy in place
    assert type(y.grad_fn).__name__ == ("_WidenedAddBackward" if len(names) == 1 else
                                        ("AddmmBackward0" if len(shape) == 2 else "BaddbmmBackward0"))
    update = float((ref - base).abs().max())
    assert float((y.detach().double() - ref).abs().max()) < 2e-2 * update  # summed in bf16: off by ~1 update
    for k, p in params.items():
        err = float((p.grad.double() - ref_p[k].grad).norm() / ref_p[k].grad.norm())
        assert err < 1e-2, (k, err)
    assert float((x.grad.double() - xr.grad).norm() / xr.grad.norm()) < 1e-2


@pytest.mark.parametrize("shape", [(4, 16), (4, 5, 16)])
@pytest.mark.parametrize("rows", [["a", "b", "a", "__base__"], ["a", "a", "b", "b"]])  # index rows; slices
def test_mixed_rows_under_bf16_autocast_train_each_adapter_as_in_float32(shape, rows):
    """A mixed batch under bf16 autocast with autograd on (``_on_rows`` on the float32-widened
    output): each row gets the base's bf16 output plus its own adapter's update summed in float32,
    and each adapter's A and B get the gradient of its own rows only, as in float64."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 24, bias=False)).to(torch.bfloat16)
    for n in ("a", "b"):
        dt.inject(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name=n)
    dt.set_adapter(model, ["a", "b"])  # both train
    params = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for k, p in params.items():
            p.normal_(0, 0.3 if "lora_A" in k else 1e-3)  # updates far below the output's bf16 spacing
    x = torch.randn(*shape).to(torch.bfloat16).requires_grad_()
    with dt.routing.adapter_rows(model, rows), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    ref_p = {k: p.detach().double().requires_grad_() for k, p in params.items()}
    xr = x.detach().double().requires_grad_()
    base = (xr @ model[0].weight.double().T).to(torch.bfloat16).double()
    ref = []
    for i, n in enumerate(rows):
        r = base[i]
        if n != "__base__":
            a, b = ref_p[f"0.adapters.{n}.lora_A.weight"], ref_p[f"0.adapters.{n}.lora_B.weight"]
            r = r + 2.0 * (xr[i] @ a.T) @ b.T
        ref.append(r)
    ref = torch.stack(ref)
    (ref * g.double()).sum().backward()
    assert y.dtype == torch.float32
    update = float((ref - base).detach().abs().max())
    assert float((y.detach().double() - ref.detach()).abs().max()) < 2e-2 * update  # summed in bf16: off by ~1 update
    for k, p in params.items():
        err = float((p.grad.double() - ref_p[k].grad).norm() / ref_p[k].grad.norm())
        assert err < 1e-2, (k, err)
    assert float((x.grad.double() - xr.grad).norm() / xr.grad.norm()) < 1e-2


def test_shared_input_cast_follows_the_inputs_grad_and_storage():
    """The float32 input's bf16 cast is shared by the hosts that read it (routing._narrow_hook), and
    made again when the input changes in any way: requires_grad_() after a first call (its gradient
    arrives), and ``x.data = ...`` with new values or the same storage in another layout (the new
    values are used), as without the sharing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    dt.inject(net, dt.LoraConfig(r=2, target_modules=["0"]))
    plain = nn.Sequential(nn.Linear(8, 8))
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "adapters" not in k})
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        x.requires_grad_(True)
        net(x).float().sum().backward()
        xr = x.detach().clone().requires_grad_(True)
        plain(xr).float().sum().backward()  # zero-initialised B: LoRA adds nothing yet
    assert x.grad is not None and torch.equal(x.grad, xr.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.randn(4, 8)
        net(y)
        y.data = torch.ones(4, 8)
        assert torch.equal(net(y), plain(torch.ones(4, 8)))
        z = torch.randn(8, 8)
        net(z)
        z.data = z.data.t()  # the same storage, another layout
        assert torch.equal(net(z), plain(z.clone()))
