"""Prompt methods against the real ``peft`` package: files both ways, logits (1e-5), loss, counts.

PEFT's causal-LM logits for prompt/P-tuning have P+T positions (virtual first); deltatune's have T
(aligned with input_ids). Comparisons use PEFT's last T positions.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt

from conftest import emulate_training, make_tg, make_tl

MODELS = {"TL": make_tl, "TG": make_tg}
P = 5

CASES = {
    "prompt": (lambda: dt.PromptTuningConfig(num_virtual_tokens=P),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "ptuning-mlp": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16),
                    lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     encoder_hidden_size=16)),
    "ptuning-lstm": (lambda: dt.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                                    encoder_reparameterization_type="LSTM"),
                     lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                      encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
    "prefix": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=P),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    "prefix-proj": (lambda: dt.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24),
                    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                    prefix_projection=True, encoder_hidden_size=24)),
    "adapter": (lambda: dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2),
                lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2)),
}

IDS = torch.tensor([[5, 17, 42, 9, 63, 2], [7, 8, 9, 10, 11, 12]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def real(logits, T):
    return logits[:, logits.shape[1] - T:]


@pytest.mark.parametrize("mname", ["TL", "TG"])
@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameter_counts_equal_peft(mname, case):
    ours, theirs = CASES[case]
    m = MODELS[mname]()
    dt.inject(m, ours())
    pm = peft.get_peft_model(MODELS[mname](), theirs())
    assert dt.count_parameters(m) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("mname", ["TL", "TG"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_into_deltatune(tmp_path, mname, case):
    _, theirs = CASES[case]
    pm = peft.get_peft_model(MODELS[mname](), theirs())
    emulate_training(pm, std=0.5)
    pm.eval()
    with torch.no_grad():
        ref = real(pm(input_ids=IDS, attention_mask=MASK).logits, IDS.shape[1])
        base = MODELS[mname]()(IDS, attention_mask=MASK).logits
    assert (ref - base).abs().max().item() > 1e-3  # the adapter is live
    pm.save_pretrained(str(tmp_path))
    m = MODELS[mname]()
    dt.load_adapter(m, str(tmp_path))
    with torch.no_grad():
        got = m(IDS, attention_mask=MASK).logits
    rows = MASK.bool()
    assert (got[rows] - ref[rows]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mname", ["TL", "TG"])
@pytest.mark.parametrize("case", list(CASES))
def test_deltatune_file_loads_into_peft(tmp_path, mname, case):
    ours, theirs = CASES[case]
    m = MODELS[mname]()
    dt.inject(m, ours())
    emulate_training(m, std=0.5)
    with torch.no_grad():
        ref = m(IDS, attention_mask=MASK).logits
    dt.save_adapter(m, str(tmp_path))
    # the file is PEFT's: one prompt_embeddings tensor for the prompt methods, PEFT's config keys
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    pm0 = peft.get_peft_model(MODELS[mname](), theirs())
    if case != "adapter":
        assert list(tensors) == ["prompt_embeddings"]
        saved_peft = peft.get_peft_model_state_dict(pm0)
        assert tensors["prompt_embeddings"].shape == saved_peft["prompt_embeddings"].shape
        for k in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                  "num_layers", "task_type"):
            assert cfg[k] == getattr(pm0.peft_config["default"], k), k
    else:
        assert sorted(tensors) == sorted(peft.get_peft_model_state_dict(pm0))
    pm = peft.PeftModel.from_pretrained(MODELS[mname](), str(tmp_path))
    with torch.no_grad():
        got = real(pm(input_ids=IDS, attention_mask=MASK).logits, IDS.shape[1])
    rows = MASK.bool()
    assert (got[rows] - ref[rows]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["prompt", "ptuning-mlp", "prefix"])
def test_loss_equals_peft_when_first_label_is_ignored(tmp_path, case):
    """PEFT also scores labels[:, 0] from the last virtual token; with it ignored the losses agree."""
    _, theirs = CASES[case]
    pm = peft.get_peft_model(make_tl(), theirs())
    emulate_training(pm, std=0.5)
    pm.eval()
    labels = IDS.clone()
    labels[:, 0] = -100
    labels[MASK == 0] = -100
    with torch.no_grad():
        ref = pm(input_ids=IDS, attention_mask=MASK, labels=labels).loss
    pm.save_pretrained(str(tmp_path))
    m = make_tl()
    dt.load_adapter(m, str(tmp_path))
    with torch.no_grad():
        got = m(IDS, attention_mask=MASK, labels=labels).loss
    assert abs(got.item() - ref.item()) <= 1e-5
