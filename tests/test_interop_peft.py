"""Interop with the real Hugging Face ``peft`` package (a test dependency; never skipped).

For plain LoRA, rsLoRA, DoRA, rank/alpha patterns, modules_to_save and embedding LoRA (plus DoRA
on embeddings, trained biases and lora_bias), on tiny Llama (nn.Linear) and tiny GPT-2
(transformers Conv1D, tied head):

* an adapter saved by deltatune loads in ``peft.PeftModel.from_pretrained`` and one saved by
  ``peft`` loads in ``deltatune.load_adapter``; logits agree to max |diff| < 1e-5 in fp32;
* ``adapter_config.json`` survives the round trip both ways, unknown keys included;
* the trainable / total parameter counts, and the printed line, equal peft's.
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

from conftest import X_IDS, emulate_training, make_tg, make_tl, maxdiff


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out / embedding notices
        yield


MAKERS = {"TL": make_tl, "TG": make_tg}
TARGETS = {"TL": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "TG": ["c_attn", "c_proj", "c_fc"]}
VARIANTS = {
    "lora": lambda k: {},
    "rslora": lambda k: {"use_rslora": True, "lora_alpha": 16},
    "dora": lambda k: {"use_dora": True},
    "rank_pattern": lambda k: {"rank_pattern": {TARGETS[k][0]: 2, TARGETS[k][-1]: 6},
                               "alpha_pattern": {TARGETS[k][1]: 32}},
    "modules_to_save": lambda k: {"modules_to_save": {"TL": ["lm_head"], "TG": ["ln_f"]}[k]},
    # PEFT matches modules_to_save by plain string suffix: "norm" is model.norm AND every
    # input_layernorm / post_attention_layernorm; "ln_2" every h.N.ln_2
    "modules_to_save_suffix": lambda k: {"modules_to_save": {"TL": ["norm"], "TG": ["ln_2"]}[k]},
    "embedding": lambda k: {"target_modules": {"TL": ["embed_tokens", "q_proj", "v_proj"],
                                               "TG": ["wte", "c_attn"]}[k]},
    "embedding_dora": lambda k: {"use_dora": True, "target_modules": {"TL": ["embed_tokens", "q_proj"],
                                                                      "TG": ["wte", "c_attn"]}[k]},
    "bias_all": lambda k: {"bias": "all"},
    "lora_bias": lambda k: {"lora_bias": True} if k == "TG" else None,
}
CASES = [(k, v) for v in VARIANTS for k in MAKERS if VARIANTS[v](k) is not None]
IDS = [f"{k}-{v}" for k, v in CASES]


def kwargs(kind, variant):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind]}
    kw.update(VARIANTS[variant](kind))
    return kw


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(X_IDS)).logits


@pytest.mark.parametrize("kind,variant", CASES, ids=IDS)
def test_deltatune_saved_loads_in_peft(kind, variant, tmp_path):
    model = MAKERS[kind]()
    dt.inject(model, dt.LoraConfig(**kwargs(kind, variant)))
    emulate_training(model)
    L = logits(model)
    with torch.no_grad():
        assert maxdiff(L, logits(MAKERS[kind]())) > 1e-3  # the adapter matters
    dt.save_adapter(model, str(tmp_path))
    pm = PeftModel.from_pretrained(MAKERS[kind](), str(tmp_path)).eval()
    assert maxdiff(logits(pm), L) < 1e-5
    # peft found every tensor of the file (nothing silently skipped): its adapter state equals the file
    from peft.utils import get_peft_model_state_dict

    file_sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    # (peft's own "auto" would add the full embedding weight when an embedding is targeted;
    # deltatune saves it only when the vocabulary was resized, see test_cases_core C07)
    peft_sd = get_peft_model_state_dict(pm, save_embedding_layers=False)
    assert set(peft_sd) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(peft_sd[k], v), k


@pytest.mark.parametrize("kind,variant", CASES, ids=IDS)
def test_peft_saved_loads_in_deltatune(kind, variant, tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(MAKERS[kind](), peft.LoraConfig(**kwargs(kind, variant))).eval()
    emulate_training(pm)
    L = logits(pm)
    pm.save_pretrained(str(tmp_path))
    model = MAKERS[kind]()
    out = dt.load_adapter(model, str(tmp_path))
    assert out is model
    assert maxdiff(logits(model), L) < 1e-5
    # and deltatune writes back the same tensors under the same keys (a file that carried full
    # embedding weights, as peft writes for targeted embeddings, is saved with them again)
    dt.save_adapter(model, str(tmp_path / "again"))
    ours = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("kind,variant", CASES, ids=IDS)
def test_trainable_parameter_counts_equal_peft(kind, variant, capsys):
    pm = get_peft_model(MAKERS[kind](), peft.LoraConfig(**kwargs(kind, variant)))
    model = dt.inject(MAKERS[kind](), dt.LoraConfig(**kwargs(kind, variant)))
    assert dt.count_parameters(model) == pm.get_nb_trainable_parameters()
    capsys.readouterr()
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out.strip()
    assert dt.print_trainable_parameters(model) == theirs
    # the same tensors are trainable, by file key
    from peft.utils import get_peft_model_state_dict

    peft_trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    ours_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(peft_trainable) == len(ours_trainable)
    assert set(get_peft_model_state_dict(pm, save_embedding_layers=False)) == set(dt.adapter_state_dict(model))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_adapter_config_json_round_trip_both_ways(kind, tmp_path):
    kw = kwargs(kind, "rank_pattern")
    kw.update(use_dora=True, lora_dropout=0.05, layers_to_transform=[1], layers_pattern={"TL": "layers",
                                                                                          "TG": "h"}[kind])
    pm = get_peft_model(MAKERS[kind](), peft.LoraConfig(**kw))
    pm.save_pretrained(str(tmp_path / "p"))
    raw = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    raw["a_key_from_the_future"] = {"nested": [1, 2]}
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(raw))
    cfg = dt.load_config(str(tmp_path / "p"))
    assert cfg.extra["a_key_from_the_future"] == {"nested": [1, 2]}
    # peft -> deltatune -> json: every key and value kept
    assert cfg.to_dict() == raw
    # deltatune -> json -> peft: peft reads the same config
    model = dt.load_adapter(MAKERS[kind](), str(tmp_path / "p"))
    dt.save_adapter(model, str(tmp_path / "d"))
    ours = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert ours == raw
    back = peft.LoraConfig.from_pretrained(str(tmp_path / "d"))
    for f in ("r", "lora_alpha", "lora_dropout", "use_dora", "rank_pattern", "alpha_pattern",
              "layers_to_transform", "layers_pattern", "bias", "use_rslora", "init_lora_weights", "fan_in_fan_out"):
        assert getattr(back, f) == getattr(pm.peft_config["default"], f), f
    assert set(back.target_modules) == set(pm.peft_config["default"].target_modules)


def test_adapter_named_like_a_key_part_round_trips_with_peft(tmp_path):
    """C05 both ways: the adapter name never reaches the keys, so "lora" and "lora_A" are safe."""
    for name in ("lora", "lora_A", "adapters"):
        model = make_tg()
        dt.inject(model, dt.LoraConfig(r=8, target_modules=["c_attn"], init_lora_weights=False), name)
        L = logits(model)
        d = tmp_path / name
        dt.save_adapter(model, str(d))
        pm = PeftModel.from_pretrained(make_tg(), str(d), adapter_name=name).eval()
        assert maxdiff(logits(pm), L) < 1e-5
