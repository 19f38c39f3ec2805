"""GGUF export (deltatune.formats.gguf) on tiny models: model files read back by gguf.GGUFReader (names,
shapes, metadata) and loaded by transformers (gguf_file=) with the logits of the merged safetensors model
(float32: 1e-5; f16/bf16/q8_0: equal to that model with its weights stored and read back in the type,
the quantization's own error); LoRA adapter files with the metadata and tensor names llama.cpp's
convert_lora_to_gguf.py writes, checked by applying them as llama.cpp does (base + alpha / r * B A,
in llama.cpp's q/k row order) against the merged model's GGUF; refusals; the Ollama template."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import deltatune as dt
from conftest import emulate_training, make_tl, make_tt, maxdiff
from deltatune.formats import gguf as gg

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.tensor([[5, 17, 42, 9, 63, 2, 11, 100]])
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2 has q/k/v biases: make them non-zero so that their permutation/naming shows
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


MAKERS = {"llama": make_tl, "llama_tied": lambda: make_tl(tie_word_embeddings=True), "qwen2": make_qwen2}


def logits(model, ids=X):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).eval()


def reader_tensors(path) -> dict:
    """GGUF name -> (ne as ggml counts it, type name, float32 numpy array in numpy (rows, cols) order)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        arr = np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(tuple(reversed([int(x) for x in t.shape])))
        out[t.name] = ([int(x) for x in t.shape], t.tensor_type.name, arr)
    return out


def merged_pair(kind):
    """(adapted model after emulated training, its merged copy)."""
    m = MAKERS[kind]()
    torch.manual_seed(1)
    dt.inject(m, dt.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    emulate_training(m)
    merged = dt.merge_and_unload(copy.deepcopy(m))
    return m, merged


# ----------------------------------------------------------------------------- model files


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2"])
def test_merged_model_gguf_f32_equals_the_merged_safetensors_model(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    adapted, merged = merged_pair(kind)
    adapted.save_pretrained(str(tmp_path / "st"), merged=True)
    st = AutoModelForCausalLM.from_pretrained(str(tmp_path / "st")).eval()
    path = str(tmp_path / "m.gguf")
    summary = gg.write_model_gguf(path, merged.state_dict(), merged.config.to_dict(), gguf_type="f32")
    g = load_gguf_model(path)
    assert maxdiff(logits(g), logits(st)) < 1e-5
    assert maxdiff(logits(st), logits(adapted)) < 1e-5
    assert maxdiff(logits(g), logits(MAKERS[kind]())) > 1e-3  # the merged adapter is in the file
    # read back: metadata and names as llama.cpp's converter writes them
    arch = "qwen2" if kind == "qwen2" else "llama"
    md = gg.read_metadata(path)
    assert md["general.architecture"] == arch and md["general.type"] == "model" and md["general.file_type"] == 0
    assert (md[f"{arch}.block_count"], md[f"{arch}.embedding_length"], md[f"{arch}.feed_forward_length"]) == (2, 32, 64)
    assert (md[f"{arch}.attention.head_count"], md[f"{arch}.attention.head_count_kv"], md[f"{arch}.vocab_size"]) == (4, 2, 128)
    assert md[f"{arch}.rope.dimension_count"] == 8 and md["general.quantization_version"] == 2
    t = reader_tensors(path)
    assert ("output.weight" in t) == (kind != "llama_tied")
    assert t["token_embd.weight"][0] == [32, 128] and t["blk.1.attn_k.weight"][0] == [32, 16]
    assert t["blk.0.ffn_down.weight"][0] == [64, 32] and t["blk.0.attn_norm.weight"][0] == [32]
    assert ("blk.0.attn_q.bias" in t) == (kind == "qwen2")
    assert {n for n, _, _ in summary.tensors} == set(t)
    # llama.cpp's q/k row order for llama (undone by transformers on load); qwen2 keeps transformers' order
    q = merged.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    want = gg.llama_permute(q, 4) if kind != "qwen2" else q
    assert np.array_equal(t["blk.0.attn_q.weight"][2], want.numpy())
    if kind != "qwen2":
        assert not torch.equal(want, q)


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_merged_model_gguf_lower_types_carry_only_their_quantization_error(gguf_type, tmp_path):
    adapted, merged = merged_pair("llama")
    path = str(tmp_path / f"m-{gguf_type}.gguf")
    gg.write_model_gguf(path, merged.state_dict(), merged.config.to_dict(), gguf_type=gguf_type)
    g = load_gguf_model(path)
    ref = copy.deepcopy(merged)  # the merged model with every 2-D weight stored in the type and read back
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.dim() >= 2:
                p.copy_(gg.roundtrip(p, gguf_type))
    assert maxdiff(logits(g), logits(ref)) < 1e-5
    err = maxdiff(logits(g), logits(merged))
    assert 0 < err < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[gguf_type]
    t = reader_tensors(path)
    assert t["blk.0.attn_q.weight"][1] == gguf_type.upper() and t["output_norm.weight"][1] == "F32"
    assert gg.read_metadata(path)["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]


def test_q8_0_falls_back_to_f16_for_rows_it_cannot_block(tmp_path):
    m = make_tl(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2)  # 48, 80: not /32
    path = str(tmp_path / "odd.gguf")
    gg.write_model_gguf(path, m.state_dict(), m.config.to_dict(), gguf_type="q8_0")
    t = reader_tensors(path)
    assert t["blk.0.attn_q.weight"][1] == "F16" and t["blk.0.ffn_down.weight"][1] == "F16"


def test_tokenizer_fields_are_copied(tmp_path):
    import gguf

    m = make_tl()
    src = str(tmp_path / "src.gguf")
    fields = {"tokenizer.ggml.model": ("gpt2", gguf.GGUFValueType.STRING, None),
              "tokenizer.ggml.tokens": ([f"t{i}" for i in range(128)], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
              "tokenizer.ggml.eos_token_id": (2, gguf.GGUFValueType.UINT32, None),
              "tokenizer.chat_template": ("{{ x }}", gguf.GGUFValueType.STRING, None)}
    gg.write_model_gguf(src, m.state_dict(), m.config.to_dict(), tokenizer=fields)
    got = gg.tokenizer_fields(src)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in fields.items()}
    dst = str(tmp_path / "dst.gguf")
    gg.write_model_gguf(dst, m.state_dict(), m.config.to_dict(), tokenizer=got)
    assert gg.read_metadata(dst, set(fields)) == {k: v[0] for k, v in fields.items()}


def test_model_gguf_refusals(tmp_path):
    from conftest import make_tg

    tg = make_tg()
    with pytest.raises(gg.GGUFExportError, match="llama, mistral, qwen2.*gpt2.*convert_hf_to_gguf"):
        gg.write_model_gguf(str(tmp_path / "x.gguf"), tg.state_dict(), tg.config.to_dict())
    m = make_tl()
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(gg.GGUFExportError, match="adapter tensor"):
        gg.write_model_gguf(str(tmp_path / "x.gguf"), m.state_dict(), m.config.to_dict())
    rope = make_tl(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(gg.GGUFExportError, match="RoPE scaling 'linear'"):
        gg.write_model_gguf(str(tmp_path / "x.gguf"), rope.state_dict(), rope.config.to_dict())
    with pytest.raises(gg.GGUFExportError, match="q4_k"):
        gg.write_model_gguf(str(tmp_path / "x.gguf"), make_tl().state_dict(), make_tl().config.to_dict(), gguf_type="q4_k")
    assert not os.listdir(tmp_path)  # nothing half-written


# ----------------------------------------------------------------------------- LoRA adapter files


def lora_case(variant):
    base = {"r": 4, "lora_alpha": 8, "target_modules": ALL7}
    extra = {"plain": {}, "rslora": {"use_rslora": True},
             "patterns": {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}},
             "embedding": {"target_modules": ["embed_tokens", "q_proj", "k_proj"]}}[variant]
    m = make_tl()
    torch.manual_seed(2)
    dt.inject(m, dt.LoraConfig(**{**base, **extra}))
    emulate_training(m, std=0.05)
    return m


def write_adapter(m, tmp_path, gguf_type="f32"):
    from deltatune.formats.peft import read_adapter_tensors

    dt.save_adapter(m, str(tmp_path / "ad"))
    path = str(tmp_path / "ad.gguf")
    summary = gg.write_lora_gguf(path, read_adapter_tensors(str(tmp_path / "ad")), dt.load_config(str(tmp_path / "ad")),
                                 m.config.to_dict(), gguf_type=gguf_type)
    return path, summary


def test_lora_gguf_metadata_and_tensor_names(tmp_path):
    m = lora_case("plain")
    path, summary = write_adapter(m, tmp_path)
    md = gg.read_metadata(path)
    assert md["general.architecture"] == "llama" and md["general.type"] == "adapter"
    assert md["adapter.type"] == "lora" and md["adapter.lora.alpha"] == 8.0 and md["general.quantization_version"] == 2
    assert "general.file_type" not in md  # the converter writes none for adapters
    t = reader_tensors(path)
    names = {f"blk.{b}.{w}.weight.lora_{ab}" for b in (0, 1) for ab in "ab"
             for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(t) == names
    # ggml's ne: lora_a [in, r], lora_b [r, out] (llama.cpp checks a.ne[0] == in, b.ne[1] == out, a.ne[1] == b.ne[0])
    assert t["blk.0.attn_k.weight.lora_a"][0] == [32, 4] and t["blk.0.attn_k.weight.lora_b"][0] == [4, 16]
    assert t["blk.1.ffn_down.weight.lora_a"][0] == [64, 4] and t["blk.1.ffn_down.weight.lora_b"][0] == [4, 32]
    assert all(ty == "F32" for _, ty, _ in t.values())
    # A is PEFT's lora_A as it is; B of v (not permuted, alpha/r as trained) too
    sd = dt.adapter_state_dict(m)
    pre = "base_model.model.model.layers.0.self_attn."
    assert np.array_equal(t["blk.0.attn_q.weight.lora_a"][2], sd[pre + "q_proj.lora_A.weight"].numpy())
    assert np.array_equal(t["blk.0.attn_v.weight.lora_b"][2], sd[pre + "v_proj.lora_B.weight"].numpy())
    assert len(summary.tensors) == len(names)


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "embedding"])
def test_lora_gguf_applied_as_llama_cpp_does_gives_the_merged_model(variant, tmp_path):
    """llama.cpp computes W x + (alpha / r) * B (A x) per pair (token_embd: rows of (B A^T)^T); in GGUF
    space that must equal the merged model's GGUF weights."""
    m = lora_case(variant)
    path, _ = write_adapter(m, tmp_path)
    base = make_tl()
    gg.write_model_gguf(str(tmp_path / "base.gguf"), base.state_dict(), base.config.to_dict())
    merged = dt.merge_and_unload(copy.deepcopy(m))
    gg.write_model_gguf(str(tmp_path / "merged.gguf"), merged.state_dict(), merged.config.to_dict())
    lora, bt, mt = reader_tensors(path), reader_tensors(str(tmp_path / "base.gguf")), reader_tensors(str(tmp_path / "merged.gguf"))
    alpha = gg.read_metadata(path)["adapter.lora.alpha"]
    targets = {n[: -len(".lora_a")] for n in lora if n.endswith(".lora_a")}
    assert targets == {n for n in mt if not np.array_equal(mt[n][2], bt[n][2])}  # exactly the changed weights
    for name in targets:
        a, b = lora[name + ".lora_a"][2].astype(np.float64), lora[name + ".lora_b"][2].astype(np.float64)
        rank = b.shape[1]
        delta = (b @ a.T).T if name == "token_embd.weight" else b @ a
        applied = bt[name][2] + alpha / rank * delta
        assert np.abs(applied - mt[name][2]).max() < 1e-5, name
    if variant == "patterns":
        assert lora["blk.0.attn_q.weight.lora_b"][0] == [2, 32]  # rank_pattern: this pair has r = 2


def test_lora_gguf_lower_types(tmp_path):
    path, _ = write_adapter(lora_case("plain"), tmp_path, gguf_type="q8_0")
    t = reader_tensors(path)
    assert t["blk.0.attn_q.weight.lora_a"][1] == "Q8_0"  # rows of 32 inputs
    assert t["blk.0.attn_q.weight.lora_b"][1] == "F16"  # rows of r = 4: the converter's f16 fallback


@pytest.mark.parametrize("config,match", [
    (lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda: dt.LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "bias='all'"),
    (lambda: dt.IA3Config(), "holds LoRA only; this adapter is IA3: merge it"),
    (lambda: dt.PromptTuningConfig(num_virtual_tokens=2), "cannot be merged either"),
])
def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(config, match, tmp_path):
    from deltatune.formats.peft import read_adapter_tensors

    m = make_tl()
    dt.inject(m, config())
    dt.save_adapter(m, str(tmp_path / "ad"))
    with pytest.raises(gg.GGUFExportError, match=match):
        gg.write_lora_gguf(str(tmp_path / "x.gguf"), read_adapter_tensors(str(tmp_path / "ad")),
                           dt.load_config(str(tmp_path / "ad")), m.config.to_dict())
    assert not (tmp_path / "x.gguf").exists()


def test_lora_gguf_refuses_a_tied_head(tmp_path):
    from deltatune.formats.peft import read_adapter_tensors

    m = make_tl(tie_word_embeddings=True)
    dt.inject(m, dt.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    dt.save_adapter(m, str(tmp_path / "ad"))
    with pytest.raises(gg.GGUFExportError, match="lm_head.*tie"):
        gg.write_lora_gguf(str(tmp_path / "x.gguf"), read_adapter_tensors(str(tmp_path / "ad")),
                           dt.load_config(str(tmp_path / "ad")), m.config.to_dict())


# ----------------------------------------------------------------------------- Ollama


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_ollama_template_of_chatml_with_default_system():
    tok = make_tt()
    tok.chat_template = CHATML
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    template, system = gg.ollama_template(render)
    assert system == "You are helpful."
    assert template == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}{{ end }}"
        "{{ range .Messages }}{{ if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
        "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
        "<|im_start|>assistant\n")
    text = gg.modelfile_text("/m/base.gguf", adapter="/m/ad.gguf", template=template, system=system,
                             stops=["<|im_end|>"])
    lines = text.splitlines()
    assert lines[0].startswith("# Ollama Modelfile written by deltatune")
    assert "FROM /m/base.gguf" in lines and "ADAPTER /m/ad.gguf" in lines
    assert 'SYSTEM """You are helpful."""' in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert f'TEMPLATE """{template}"""' in text


def test_ollama_template_of_a_template_without_system_block():
    tok = make_tt()  # bos, then "<|role|> content <|end|> " per message: no default system
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    template, system = gg.ollama_template(render)
    assert system is None
    assert template.startswith("{{ if .System }}<s><|system|> {{ .System }} <|end|> {{ else }}<s>{{ end }}")
    assert template.endswith("{{ end }}{{ end }}<|assistant|>")


# ----------------------------------------------------------------------------- the commands, on a tiny GGUF base


def tiny_gguf_base(path) -> str:
    """TL written as a GGUF model file with a small byte-level BPE tokenizer and a ChatML template (the
    shape of the default model's file), so the commands can train on it and merge into GGUF."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    T = gguf.GGUFValueType
    chars = [c for c in bytes_to_unicode().values() if c.isalnum() or c in "ĠĊ"]
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [c for c in chars if c not in specials][: 127 - len(specials)] + ["ab"]
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fields = {"tokenizer.ggml.model": ("gpt2", T.STRING, None), "tokenizer.ggml.pre": ("default", T.STRING, None),
              "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
              "tokenizer.ggml.token_type": ([3] * 5 + [1] * 123, T.ARRAY, T.INT32),
              "tokenizer.ggml.merges": (["a b"], T.ARRAY, T.STRING),
              "tokenizer.ggml.bos_token_id": (1, T.UINT32, None), "tokenizer.ggml.eos_token_id": (4, T.UINT32, None),
              "tokenizer.ggml.padding_token_id": (0, T.UINT32, None),
              "tokenizer.chat_template": (template, T.STRING, None)}
    m = make_tl()
    gg.write_model_gguf(str(path), m.state_dict(), m.config.to_dict(), tokenizer=fields, name="tiny")
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(base GGUF, adapter folder of a 3-step LoRA run on it, root folder)."""
    import json
    import random

    from deltatune.cli import main

    root = tmp_path_factory.mktemp("gg")
    base = tiny_gguf_base(root / "tiny.gguf")
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4)))  # noqa: E731
    with open(root / "d.jsonl", "w") as fh:
        for _ in range(24):
            fh.write(json.dumps({"prompt": f"{word()} {word()}", "completion": word()}) + "\n")
    out = root / "run"
    assert main(["train", "--model", base, "--data", str(root / "d.jsonl"), "--out", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--eval-size", "4", "--eval-every", "0", "--ppl-size", "0", "--threads", "1",
                 "--no-progress", "--no-plot", "--rank", "4", "--lora-alpha", "8", "--lr", "5e-2"]) == 0
    return base, str(out), root


def cli(capsys, *argv):
    from deltatune.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_command_writes_the_adapter_gguf_and_modelfile(tiny_run, capsys):
    base, adapter, root = tiny_run
    out = root / "ex" / "ad.gguf"
    code, stdout, err = cli(capsys, "export", "--adapter", adapter, "--format", "gguf", "--out", str(out))
    assert code == 0 and str(out) in stdout, err
    t = reader_tensors(str(out))
    assert len(t) == 2 * 2 * 7 and all(n.endswith((".lora_a", ".lora_b")) for n in t)
    assert gg.read_metadata(str(out))["adapter.lora.alpha"] == 8.0
    text = (root / "ex" / "Modelfile").read_text()
    assert f"FROM {base}\n" in text and f"ADAPTER {out}\n" in text
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    # never replaced without --overwrite; with it, only deltatune's GGUF / Modelfile
    code, _, err = cli(capsys, "export", "--adapter", adapter, "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert cli(capsys, "export", "--adapter", adapter, "--out", str(out), "--overwrite")[0] == 0
    mine = root / "ex2" / "notes.gguf"
    mine.parent.mkdir()
    mine.write_text("my notes")
    code, _, err = cli(capsys, "export", "--adapter", adapter, "--out", str(mine), "--overwrite")
    assert code == 2 and "never replaced" in err and mine.read_text() == "my notes"
    code, _, err = cli(capsys, "export", "--adapter", adapter, "--out", str(root / "x.gguf"), "--gguf-type", "q4_k")
    assert code == 2 and "--gguf-type must be one of f32, f16, bf16, q8_0" in err


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_merge_command_gguf_equals_the_merged_safetensors_model(tiny_run, gguf_type, capsys):
    from transformers import AutoModelForCausalLM

    base, adapter, root = tiny_run
    st_dir = root / f"st-{gguf_type}"
    assert cli(capsys, "merge", "--adapter", adapter, "--out", str(st_dir))[0] == 0
    out = root / f"mg-{gguf_type}" / "merged.gguf"
    code, stdout, err = cli(capsys, "merge", "--adapter", adapter, "--out", str(out), "--format", "gguf",
                            "--gguf-type", gguf_type)
    assert code == 0 and str(out) in stdout, err
    st = AutoModelForCausalLM.from_pretrained(str(st_dir)).eval()
    g = load_gguf_model(str(out))
    ref = copy.deepcopy(st)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() >= 2:
                p.copy_(gg.roundtrip(p, gguf_type))
    assert maxdiff(logits(g), logits(ref)) < 1e-5
    assert maxdiff(logits(st), logits(load_gguf_model(base))) > 1e-3  # the training is in it
    assert gg.tokenizer_fields(str(out)).keys() == gg.tokenizer_fields(base).keys()
    assert gg.read_metadata(str(out), {"tokenizer.ggml.tokens"}) == gg.read_metadata(base, {"tokenizer.ggml.tokens"})
    text = (out.parent / "Modelfile").read_text()
    assert f"FROM {out}\n" in text and "ADAPTER" not in text


def test_merge_command_gguf_needs_a_gguf_base(capsys, tmp_path):
    from conftest import model_folder

    folder = model_folder(tmp_path / "tl", make_tl(), make_tt())
    m = make_tl()
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    dt.save_adapter(m, str(tmp_path / "ad"))
    code, _, err = cli(capsys, "merge", "--adapter", str(tmp_path / "ad"), "--model", folder, "--format", "gguf",
                       "--out", str(tmp_path / "m.gguf"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "convert_hf_to_gguf.py" in err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.integration
def test_ollama_template_of_the_default_model(smollm):
    _, tok = smollm
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    template, system = gg.ollama_template(render)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert template.startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}{{ end }}")
    assert template.endswith("{{ end }}{{ end }}<|im_start|>assistant\n")
