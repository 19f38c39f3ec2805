"""Prompt tuning, P-tuning, prefix tuning and LLaMA-Adapter on the tiny TL/TG models.

Covers, beyond the invariant matrix (test_matrix.py: init, gradients, disable, merge refusal, save/load,
load errors, delete): loss = hand computation (virtual positions never count), attention masks
extended, case C08 (cache on == cache off == hand-written greedy loop, prompt live, left-padded rows
== rows alone), manual cached forward, LLaMA-Adapter placement, several adapters, TEXT/SAMPLE_VOCAB
init, trainable reloads, config validation, the CLI builders.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.prompt import CONTAINER, PromptEmbedding

from conftest import emulate_training, make_tg, make_tl

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"TL": make_tl, "TG": make_tg}
P = 8


def cfg_for(method: str):
    return {
        "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=P),
        "ptuning-mlp": lambda: dt.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16),
        "ptuning-lstm": lambda: dt.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                                       encoder_reparameterization_type="LSTM"),
        "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=P),
        "prefix-proj": lambda: dt.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                     encoder_hidden_size=24),
        "adapter": lambda: dt.AdaptionPromptConfig(adapter_len=4, adapter_layers=2),
    }[method]()


METHODS = ["prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-proj", "adapter"]


def make_live(model, method: str):
    """Give the fresh adapter clearly visible effect (C08: prompt embeddings x 10)."""
    with torch.no_grad():
        if method == "prompt":
            model.prompt_adapters["default"].embedding.weight.mul_(10)
        elif method == "adapter":
            for n, p in model.named_parameters():
                if n.endswith("adaption_gate"):
                    p.fill_(1.0)
        else:
            emulate_training(model, std=1.0)


def adapted(mname: str, method: str, live: bool = True):
    m = MODELS[mname]()
    m.generation_config.eos_token_id = None  # always 6 new tokens, comparable with a hand loop
    dt.inject(m, cfg_for(method))
    if live:
        make_live(m, method)
    return m


def greedy_loop(model, ids, n):
    """(c) of C08: full-sequence forward at every step, no cache."""
    seq = ids
    for _ in range(n):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def inner(model):
    return model.model if hasattr(model, "model") else model.transformer


# ----------------------------------------------------------------------------- C08


@pytest.mark.parametrize("mname", ["TL", "TG"])
@pytest.mark.parametrize("method", METHODS)
def test_c08_generate_cache_on_off_loop_and_padding(mname, method, X, X2):
    base = MODELS[mname]().eval()
    with torch.no_grad():
        base_logits = base(X).logits[:, -1]
    m = adapted(mname, method)
    with torch.no_grad():
        a = m.generate(X, max_new_tokens=6, do_sample=False)
        b = m.generate(X, max_new_tokens=6, do_sample=False, use_cache=False)
        c = greedy_loop(m, X, 6)
        first = m(X).logits[:, -1]
    assert a.shape == (1, X.shape[1] + 6)
    assert torch.equal(a, b), (a, b)
    assert torch.equal(a, c), (a, c)
    assert (first - base_logits).abs().max().item() > 1e-3  # the prompt is live

    ids, mask = X2
    with torch.no_grad():
        batch = m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for row in range(2):
            alone = ids[row : row + 1, mask[row].bool()]
            single = m.generate(alone, max_new_tokens=6, do_sample=False)
            assert torch.equal(batch[row, -6:], single[0, -6:]), (row, batch, single)


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_c08_mask_passed_to_base_covers_virtual_tokens(method, X2):
    m = adapted("TL", method)
    ids, mask = X2
    seen = []

    def spy(mod, args, kwargs):
        cache = kwargs.get("cache")
        seen.append((kwargs.get("attention_mask"), cache.get_seq_length() if cache is not None else 0,
                     kwargs.get("position_ids")))

    h = inner(m).register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    assert len(seen) == 3
    for step, (am, cache, pos) in enumerate(seen):
        assert am.shape == (2, P + ids.shape[1] + step)
        assert torch.all(am[:, :P] == 1)
        assert torch.equal(am[:, P : P + ids.shape[1]], mask)
    # first step: positions of real tokens continue after the P virtual ones; padding rows shifted too
    am0, cache0, pos0 = seen[0]
    real_pos = pos0[:, -ids.shape[1]:]
    assert torch.equal(real_pos[1], torch.arange(P, P + 6))
    assert torch.equal(real_pos[0, 2:], torch.arange(P, P + 4))
    if method.startswith("prefix"):
        assert cache0 == P  # the prefix is in the cache before the first real token
    else:
        assert torch.equal(pos0[:, :P], torch.arange(P).expand(2, P))


# ----------------------------------------------------------------------------- loss, masks, outputs


@pytest.mark.parametrize("mname", ["TL", "TG"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_is_hand_computed_over_real_tokens(mname, method):
    m = adapted(mname, method)
    ids = torch.tensor([[5, 17, 42, 9, 63, 2, 11], [7, 8, 9, 10, 11, 12, 13]])
    labels = ids.clone()
    labels[1, 3] = -100
    out = m(ids, labels=labels)
    assert out.logits.shape == (2, ids.shape[1], 128)  # our choice: no virtual positions in the output
    logits = out.logits.float()
    hand = F.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - hand.item()) < 1e-5
    # the first label is never predicted (no real position before it), exactly as for the base model
    other = labels.clone()
    other[:, 0] = -100
    assert abs(m(ids, labels=other).loss.item() - out.loss.item()) < 1e-6


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "prefix"])
def test_attention_mask_extended_in_forward(method, X2):
    m = adapted("TG", method)
    ids, mask = X2
    seen = {}

    def spy(mod, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")
        seen["cache_len"] = kwargs["cache"].get_seq_length() if kwargs.get("cache") is not None else 0

    h = inner(m).register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            out = m(ids, attention_mask=mask)
    finally:
        h.remove()
    assert seen["mask"].shape == (2, P + 6)
    assert torch.all(seen["mask"][:, :P] == 1) and torch.equal(seen["mask"][:, P:], mask)
    assert seen["cache_len"] == (P if method == "prefix" else 0)
    assert out.logits.shape == (2, 6, 128)


@pytest.mark.parametrize("mname", ["TL", "TG"])
@pytest.mark.parametrize("method", METHODS)
def test_manual_cached_forward_matches_full_forward(mname, method, X):
    m = adapted(mname, method)
    with torch.no_grad():
        full = m(X).logits
        o1 = m(X[:, :4], use_cache=True)
        o2 = m(X[:, 4:], cache=o1.cache, use_cache=True)
        mask = torch.ones_like(X)
        o3 = m(X[:, 4:], attention_mask=mask, cache=m(X[:, :4], attention_mask=mask[:, :4], use_cache=True).cache)
    assert torch.allclose(o1.logits, full[:, :4], atol=1e-5)
    assert torch.allclose(o2.logits, full[:, 4:], atol=1e-5)
    assert torch.allclose(o3.logits, full[:, 4:], atol=1e-5)


def test_return_dict_false_gives_aligned_tuple(X):
    m = adapted("TL", "prompt")
    with torch.no_grad():
        ref = m(X).logits
        tup = m(X, return_dict=False, use_cache=False)
    assert isinstance(tup, tuple)
    assert torch.equal(tup[0], ref)


def test_positional_input_ids_and_inputs_embeds(X):
    m = adapted("TL", "prompt")
    with torch.no_grad():
        ref = m(input_ids=X).logits
        pos = m(X).logits
        emb = m(inputs_embeds=m.get_input_embeddings()(X)).logits
    assert torch.equal(ref, pos)
    assert torch.allclose(ref, emb, atol=1e-6)


# ----------------------------------------------------------------------------- LLaMA-Adapter


def test_llama_adapter_targets_top_layers():
    m = make_tl(num_hidden_layers=3)
    dt.inject(m, dt.AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    names = sorted(n for n, _ in m.named_parameters() if "adaption" in n)
    assert names == [f"model.layers.{i}.self_attn.adapters.default.{p}" for i in (1, 2)
                     for p in ("adaption_gate", "adaption_prompt")]
    with pytest.raises(ValueError, match="only 3"):
        dt.inject(make_tl(num_hidden_layers=3), dt.AdaptionPromptConfig(adapter_len=4, adapter_layers=4))


# ----------------------------------------------------------------------------- several adapters


def test_set_adapter_switches_prompts_and_refuses_two_active(X):
    m = make_tl()
    dt.inject(m, dt.PromptTuningConfig(num_virtual_tokens=4), "a")
    dt.inject(m, dt.PrefixTuningConfig(num_virtual_tokens=3), "b")
    with torch.no_grad():
        la = m(X).logits
        dt.set_adapter(m, "b")
        lb = m(X).logits
        assert not torch.allclose(la, lb)
        assert all(p.requires_grad for p in m.prompt_adapters["b"].parameters())
        assert not any(p.requires_grad for p in m.prompt_adapters["a"].parameters())
        dt.set_adapter(m, ["a", "b"])
        with pytest.raises(ValueError, match="one prompt method at a time"):
            m(X)
        dt.set_adapter(m, "a")
        assert torch.equal(m(X).logits, la)  # the failed call left no stale state behind
        dt.delete_adapter(m, "a")
        dt.set_adapter(m, "b")
        assert torch.equal(m(X).logits, lb)


def test_prompt_tuning_composes_with_lora(X):
    m = make_tl()
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj"]), "lora")
    dt.inject(m, dt.PromptTuningConfig(num_virtual_tokens=4), "pt")
    emulate_training(m, std=0.5)  # only the active ("lora") is trainable here
    with torch.no_grad():
        lora_only = m(X).logits
        dt.set_adapter(m, ["lora", "pt"])
        both = m(X).logits
        dt.set_adapter(m, "pt")
        pt_only = m(X).logits
    assert both.shape == lora_only.shape == pt_only.shape == (1, 6, 128)
    assert not torch.allclose(both, lora_only) and not torch.allclose(both, pt_only)


# ----------------------------------------------------------------------------- init, config, errors


class _TinyTokenizer:
    name_or_path = "tiny-tok"

    def __call__(self, text):
        return {"input_ids": [3 + (ord(ch) % 100) for ch in text]}


def test_text_init_uses_word_embeddings_of_the_text():
    m = make_tl()
    cfg = dt.PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc")
    dt.inject(m, cfg, tokenizer=_TinyTokenizer())
    ids = torch.tensor([3 + ord(c) % 100 for c in "abcabca"])
    assert torch.equal(m.prompt_adapters["default"].embedding.weight, m.get_input_embeddings().weight[ids])
    assert cfg.tokenizer_name_or_path == "tiny-tok"  # PEFT requires it for TEXT; recorded from the object
    m2 = make_tl()
    cfg2 = dt.PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc",
                                 tokenizer_name_or_path=_TinyTokenizer())  # an object in the config works too
    dt.inject(m2, cfg2)
    assert torch.equal(m2.prompt_adapters["default"].embedding.weight, m2.get_input_embeddings().weight[ids])
    assert cfg2.tokenizer_name_or_path == "tiny-tok" and "tiny-tok" in str(cfg2.to_dict())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dt.inject(make_tl(), dt.PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                                   prompt_tuning_init_text="abc"))
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        dt.PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT")


def test_sample_vocab_init_takes_vocabulary_rows():
    m = make_tl()
    dt.inject(m, dt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    w = m.get_input_embeddings().weight
    for row in m.prompt_adapters["default"].embedding.weight:
        assert (w == row).all(dim=1).any()


def test_geometry_read_from_model_config():
    m = make_tl()
    c = dt.PrefixTuningConfig(num_virtual_tokens=3)
    dt.inject(m, c)
    # PEFT's grouped-query rule: the prefix has kv-head geometry (2 kv heads x head_dim 8)
    assert (c.num_layers, c.token_dim, c.num_attention_heads, c.encoder_hidden_size) == (2, 16, 2, 16)
    assert c.num_transformer_submodules == 1 and c.task_type == "CAUSAL_LM"
    g = make_tg()
    c2 = dt.PromptEncoderConfig(num_virtual_tokens=3)
    dt.inject(g, c2)
    assert (c2.num_layers, c2.token_dim, c2.num_attention_heads, c2.encoder_hidden_size) == (2, 32, 4, 32)


def test_config_validation():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        dt.inject(make_tl(), dt.PromptTuningConfig())
    with pytest.raises(ValueError, match="positive integer"):
        dt.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="MLP"):
        dt.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="adapter_len"):
        dt.inject(make_tl(), dt.AdaptionPromptConfig(adapter_layers=1))
    m = make_tl()
    with pytest.raises(ValueError):
        dt.inject(m, dt.PromptTuningConfig())
    assert CONTAINER not in m._modules and dt.adapter_names(m) == []


def test_prefix_tuning_refuses_gradient_checkpointing(X):
    m = make_tl()
    enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
    enable()
    dt.inject(m, dt.PrefixTuningConfig(num_virtual_tokens=3))
    m.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        m(X, labels=X)


def test_trainable_reload_trains_the_saved_table(tmp_path):
    """The file holds an encoder's output only: a trainable reload trains that (P, width) table directly."""
    for method in ("prompt", "ptuning-lstm", "prefix-proj"):
        dt.save_adapter(adapted("TL", method), str(tmp_path / method))
        for trainable in (False, True):
            m2 = dt.load_adapter(make_tl(), str(tmp_path / method), is_trainable=trainable)
            width = 2 * 2 * 16 if method.startswith("prefix") else 32
            assert dt.count_parameters(m2)[0] == (P * width if trainable else 0)


def test_prompt_module_is_plain_and_fp32_by_default():
    m = make_tl().to(torch.bfloat16)
    dt.inject(m, dt.PromptTuningConfig(num_virtual_tokens=4))
    mod = m.prompt_adapters["default"]
    assert isinstance(mod, PromptEmbedding) and mod.embedding.weight.dtype == torch.float32
    with torch.no_grad():
        out = m(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (1, 3, 128)


# ----------------------------------------------------------------------------- CLI builders


def test_cli_builders_make_working_configs(tmp_path, X):
    from deltatune.train.config import TrainConfig
    from deltatune.train.presets import PRESETS, PROMPT_INIT_TEXT_TASK

    def build(method, options, **fields):
        return PRESETS[method].build(TrainConfig(**fields), options)

    missing = str(tmp_path / "no-model")
    pt = build("prompt-tuning", {}, model=missing)
    assert isinstance(pt, dt.PromptTuningConfig) and pt.num_virtual_tokens == 20
    assert pt.prompt_tuning_init == "RANDOM"  # no tokenizer to be found: TEXT falls back to RANDOM
    pt_text = build("prompt-tuning", {}, model=None)
    if pt_text.prompt_tuning_init == "TEXT":  # the default model's tokenizer is installed
        assert pt_text.prompt_tuning_init_text == PROMPT_INIT_TEXT_TASK and pt_text.tokenizer_name_or_path
    cfgs = [
        pt,
        build("p-tuning", {"num_virtual_tokens": "6", "encoder_reparameterization_type": "lstm",
                           "encoder_hidden_size": "8"}),
        build("prefix-tuning", {"prefix_projection": "true", "encoder_hidden_size": "8"}),
        build("llama-adapter", {"adapter_layers": "2"}, target_modules="all-linear"),
    ]
    assert cfgs[1].encoder_reparameterization_type == "LSTM" and cfgs[1].num_virtual_tokens == 6
    assert cfgs[2].prefix_projection is True and cfgs[3].adapter_len == 10 and cfgs[3].target_modules is None
    for cfg in cfgs:
        m = make_tl()
        dt.inject(m, cfg)
        out = m(X, labels=X)
        assert out.logits.shape == (1, 6, 128) and torch.isfinite(out.loss)


def test_prefix_beam_search_without_cache_equals_with_cache(X2):
    """A cache made only to carry the prefix (use_cache=False) is taken out of the output, so
    generate does not try to reorder a None cache between beams."""
    ids, mask = X2
    m = make_tl()
    dt.inject(m, dt.PrefixTuningConfig(num_virtual_tokens=3))
    gen = dict(attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = m.generate(ids, use_cache=True, **gen)
        uncached = m.generate(ids, use_cache=False, **gen)
        out = m(ids, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, uncached)
    assert "cache" not in out.keys() and "past_key_values" not in out.keys()
