"""Prompt methods on the real SmolLM2-135M: cached and uncached greedy generate() agree (C08)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt

pytestmark = pytest.mark.integration

PROMPTS = ["Give the plural of mouse.", "Give the past tense of the verb swim, please."]
NEW = 4


def _batch(tok):
    rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            for p in PROMPTS]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (T - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _configs(tok):
    return {
        "prompt-tuning": (dt.PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                prompt_tuning_init_text="Answer with one English word."),
                          {"tokenizer": tok}),
        "p-tuning": (dt.PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=64), {}),
        "prefix-tuning": (dt.PrefixTuningConfig(num_virtual_tokens=8), {}),
        "llama-adapter": (dt.AdaptionPromptConfig(adapter_len=10, adapter_layers=4), {}),
    }


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning", "llama-adapter"])
def test_smollm_cached_and_uncached_greedy_generate_agree(smollm, method):
    model, tok = smollm
    ids, mask = _batch(tok)
    cfg, opts = _configs(tok)[method]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            base_first = model(ids, attention_mask=mask).logits[:, -1]
        dt.inject(model, cfg, "itest", **opts)
        if method == "llama-adapter":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("adaption_gate"):
                        p.fill_(0.5)
        gen = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                   pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            out = model.generate(ids, use_cache=True, output_logits=True, return_dict_in_generate=True, **gen)
            cached, first = out.sequences, out.logits[0]
            uncached = model.generate(ids, use_cache=False, **gen)
        assert (first - base_first).abs().max().item() > 1e-3  # the adapter is live
        assert cached.shape == (2, ids.shape[1] + NEW)
        assert torch.equal(cached, uncached), (tok.batch_decode(cached[:, ids.shape[1]:]),
                                               tok.batch_decode(uncached[:, ids.shape[1]:]))
    finally:
        if "itest" in dt.adapter_names(model):
            dt.delete_adapter(model, "itest")
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    # the shared session model is left as it was (delete_adapter restores the exact base output: unit tests)
    assert dt.adapter_names(model) == [] and "prompt_adapters" not in model._modules
    assert not model._forward_pre_hooks and not any("adaption" in n for n, _ in model.named_parameters())
