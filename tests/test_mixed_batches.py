"""Mixed-adapter batches: one adapter (or the base model) per row, through the one routing point.

Every check compares a mixed batch with the same rows run "alone": the batch run with
``set_adapter(name)`` (``disable_adapter`` for ``"__base__"``), row by row, in fp32 within 1e-5
(the forward's rows, generate's tokens and scores). The batches are left-padded; generation runs
with the key/value cache on and off, greedy and with beam search (one name per input row,
repeated per beam by deltatune). Methods: LoRA, rsLoRA, DoRA, (IA)3, bottleneck (Houlsby,
Pfeiffer, parallel), LLaMA-Adapter, ``modules_to_save`` copies, prompt tuning, P-tuning and prefix
tuning of different lengths, mixed with each other and with base rows.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.adapters import get_state

from conftest import make_pm, make_tg, make_tl, maxdiff

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def perturb(model, names, std=0.1, seed=3):
    """Random values for every tensor of the named adapters (LLaMA-Adapter gates to 0.7), so each
    adapter moves the output and no two are alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            for p in dt.get_record(model, n).parameters(model):
                if p.dim() == 1 and p.numel() == 1:  # a gate
                    p.fill_(0.7)
                else:
                    p.add_(torch.randn(p.shape, generator=g) * std)


def alone(model, name, fn):
    """``fn()`` with only ``name`` acting (the base model for "__base__"); the active set comes back."""
    if name == "__base__":
        with dt.disable_adapter(model):
            return fn()
    prev = dt.active_adapters(model)
    dt.set_adapter(model, name)
    try:
        return fn()
    finally:
        dt.set_adapter(model, prev)


def layer_adapters(kind):
    """name -> config of the layer methods, for the TL (Llama) and TG (GPT-2) tiny models."""
    t = {"TL": ["q_proj", "v_proj", "down_proj"], "TG": ["c_attn", "c_proj", "c_fc"]}[kind]
    return {
        "lora": dt.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False),
        "rslora": dt.LoraConfig(r=2, lora_alpha=4, target_modules=t[:2], use_rslora=True, init_lora_weights=False),
        "dora": dt.LoraConfig(r=2, target_modules=t[1:], use_dora=True, init_lora_weights=False),
        "ia3": dt.IA3Config(),
        "houlsby": dt.BottleneckConfig(style="houlsby", reduction_factor=4),
        "pfeiffer": dt.BottleneckConfig(style="pfeiffer", reduction_factor=4),
        "parallel": dt.BottleneckConfig(style="parallel", reduction_factor=4),
        "llama_adapter": dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=1),
        "copies": dt.LoraConfig(r=2, target_modules=t[:1], modules_to_save=["lm_head" if kind == "TL" else "ln_f"]),
    }


def prompt_adapters():
    return {
        "prompt3": dt.PromptTuningConfig(num_virtual_tokens=3),
        "prompt5": dt.PromptTuningConfig(num_virtual_tokens=5),
        "ptuning": dt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
        "prefix2": dt.PrefixTuningConfig(num_virtual_tokens=2),
        "prefix6": dt.PrefixTuningConfig(num_virtual_tokens=6),
    }


def build(kind, configs):
    model = {"TL": make_tl, "TG": make_tg}[kind]()
    for n, c in configs.items():
        dt.inject(model, c, n)
    perturb(model, list(configs))
    return model


def batch(n_rows, T=7, seed=0):
    """(ids, mask): n_rows left-padded rows of 2..T tokens (ids 3..127; pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n_rows, T), generator=g)
    lengths = [T - (i % (T - 1)) for i in range(n_rows)]
    mask = (torch.arange(T)[None, :] >= torch.tensor([T - n for n in lengths])[:, None]).long()
    return ids * mask, mask


def check_rows(model, names, ids, mask, **kw):
    """Mixed-batch logits vs each row alone (real positions); returns the largest difference and
    the smallest distance of a non-base row from the base output (so that the check can fail)."""
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, adapter_names=names, **kw).logits
        base = alone(model, "__base__", lambda: model(ids, attention_mask=mask, **kw).logits)
        worst, moved = 0.0, float("inf")
        for n in dict.fromkeys(names):
            ref = alone(model, n, lambda: model(ids, attention_mask=mask, **kw).logits)
            for i in [i for i, m in enumerate(names) if m == n]:
                real = mask[i].bool()
                worst = max(worst, maxdiff(mixed[i][real], ref[i][real]))
                if n != "__base__":
                    moved = min(moved, maxdiff(ref[i][real], base[i][real]))
    return worst, moved


@pytest.mark.parametrize("kind", ["TL", "TG"])
def test_mixed_forward_gives_each_row_what_it_gets_alone(kind):
    configs = layer_adapters(kind)
    if kind == "TG":
        configs.pop("llama_adapter")
    model = build(kind, configs)
    names = list(configs) + ["__base__"] + list(configs)[:3]
    ids, mask = batch(len(names))
    worst, moved = check_rows(model, names, ids, mask)
    assert worst <= TOL, worst
    assert moved > 1e-3, moved  # every adapter changes its rows


@pytest.mark.parametrize("kind", ["TL", "TG"])
def test_mixed_prompt_methods_of_any_length_with_base_and_layer_rows(kind):
    configs = {**prompt_adapters(), "lora": layer_adapters(kind)["lora"]}
    model = build(kind, configs)
    names = ["prompt3", "__base__", "prefix6", "ptuning", "prompt5", "lora", "prefix2", "prompt3", "__base__"]
    ids, mask = batch(len(names))
    worst, moved = check_rows(model, names, ids, mask)
    assert worst <= TOL and moved > 1e-3, (worst, moved)
    worst, _ = check_rows(model, names, ids, torch.ones_like(mask))  # no padding: the mask is made for the rows
    assert worst <= TOL, worst


def test_mixed_prompt_training_loss_counts_each_row_as_alone():
    """labels go through the mixed layout: the batch loss is the mean over every row's targets,
    each scored as in its row run alone (with its own padding)."""
    model = build("TL", prompt_adapters())
    names = ["prompt3", "prefix6", "__base__", "ptuning"]
    ids, mask = batch(len(names))
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, labels=labels, adapter_names=names).loss
        sums, count = 0.0, 0
        for i, n in enumerate(names):
            one = alone(model, n, lambda: model(ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]))
            k = int((labels[i, 1:] != -100).sum())  # the first label is never predicted
            sums, count = sums + float(one.loss) * k, count + k
    assert abs(float(mixed) - sums / count) <= TOL


GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def check_generate(model, names, ids, mask, per_row=1, **kw):
    """Mixed generate vs each adapter's rows generated alone: tokens equal, scores within TOL."""
    with torch.no_grad():
        mixed = model.generate(ids, attention_mask=mask, adapter_names=names, **GEN, **kw)
        worst = 0.0
        for n in dict.fromkeys(names):
            ref = alone(model, n, lambda: model.generate(ids, attention_mask=mask, **GEN, **kw))
            rows = [i * per_row + j for i, m in enumerate(names) if m == n for j in range(per_row)]
            assert mixed.sequences[rows].tolist() == ref.sequences[rows].tolist(), n
            if "num_beams" not in kw:
                worst = max(worst, max(maxdiff(a[rows], b[rows]) for a, b in zip(mixed.scores, ref.scores)))
    return worst


@pytest.mark.parametrize("use_cache", [True, False])
def test_mixed_generate_with_and_without_cache(use_cache):
    configs = {**layer_adapters("TL"), **prompt_adapters()}
    model = build("TL", configs)
    names = ["lora", "prefix6", "__base__", "dora", "prompt3", "ia3", "ptuning", "pfeiffer", "llama_adapter",
             "copies", "prompt5", "prefix2", "rslora", "parallel"]
    ids, mask = batch(len(names))
    assert check_generate(model, names, ids, mask, use_cache=use_cache) <= TOL


def test_mixed_beam_search_repeats_each_name_per_beam():
    configs = {**layer_adapters("TL"), **prompt_adapters()}
    model = build("TL", configs)
    names = ["lora", "prefix6", "__base__", "dora", "prompt3", "ptuning", "houlsby", "copies"]
    ids, mask = batch(len(names))
    check_generate(model, names, ids, mask, num_beams=3)
    check_generate(model, names, ids, mask, per_row=2, num_beams=3, num_return_sequences=2)
    check_generate(model, names, ids, mask, num_beams=2, use_cache=False)


def test_lora_on_embeddings_and_convolutions_per_row():
    """PM: Embedding, Conv1d, Conv2d and Linear hosts; plain and DoRA adapters on each kind."""
    model = make_pm()
    targets = ["emb", "conv1", "conv2", "lin"]
    dt.inject(model, dt.LoraConfig(r=2, target_modules=targets, init_lora_weights=False), "a")
    dt.inject(model, dt.LoraConfig(r=3, target_modules=targets, use_dora=True, init_lora_weights=False), "b")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["lin"], modules_to_save=["classifier"]), "c")
    perturb(model, ["a", "b", "c"])
    ids = torch.randint(0, 40, (5, 6), generator=torch.Generator().manual_seed(1))
    names = ["b", "a", "__base__", "c", "a"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names)
        for n in dict.fromkeys(names):
            ref = alone(model, n, lambda: model(ids))
            rows = [i for i, m in enumerate(names) if m == n]
            assert maxdiff(mixed[rows], ref[rows]) <= TOL, n
            if n != "__base__":
                assert maxdiff(ref[rows], alone(model, "__base__", lambda: model(ids))[rows]) > 1e-3


def test_one_adapter_on_every_row_is_the_plain_path_bit_for_bit():
    model = build("TL", {k: v for k, v in layer_adapters("TL").items() if k in ("lora", "dora", "ia3")})
    ids, mask = batch(4)
    with torch.no_grad():
        for n in ("lora", "dora", "ia3"):
            ref = alone(model, n, lambda: model(ids, attention_mask=mask).logits)
            assert torch.equal(model(ids, attention_mask=mask, adapter_names=[n] * 4).logits, ref)
        base = alone(model, "__base__", lambda: model(ids, attention_mask=mask).logits)
        assert torch.equal(model(ids, attention_mask=mask, adapter_names=["__base__"] * 4).logits, base)


def test_context_manager_equals_keyword_and_routing_comes_back():
    model = build("TL", {k: v for k, v in layer_adapters("TL").items() if k in ("lora", "ia3")})
    ids, mask = batch(3)
    names = ["ia3", "__base__", "lora"]
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits  # the active adapter: "lora"
        kw = model(ids, attention_mask=mask, adapter_names=names).logits
        with dt.adapter_rows(model, names):
            cm = model(ids, attention_mask=mask).logits
            assert get_state(model).rows.names == tuple(names)
        assert get_state(model).rows is None
        assert torch.equal(kw, cm)
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
        with pytest.raises(ValueError, match="nope"):
            model(ids, attention_mask=mask, adapter_names=["lora", "nope", "ia3"])
        assert get_state(model).rows is None and torch.equal(model(ids, attention_mask=mask).logits, before)
        with pytest.raises(RuntimeError):
            with dt.adapter_rows(model, names):
                raise RuntimeError("inside")
        assert get_state(model).rows is None


def test_bad_names_are_clear_errors_never_a_fall_back_to_the_base():
    model = build("TL", {"lora": layer_adapters("TL")["lora"]})
    ids, mask = batch(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"adapter_names\[1\] = 'typo' is not an adapter of this model"):
            model(ids, attention_mask=mask, adapter_names=["lora", "typo"])
        with pytest.raises(ValueError, match="'typo'"):
            model.generate(ids, attention_mask=mask, adapter_names=["typo", "lora"], max_new_tokens=2, pad_token_id=0)
        with pytest.raises(ValueError, match="'typo'"):
            with dt.adapter_rows(model, ["typo", "__base__"]):
                pass
        with pytest.raises(ValueError, match="3 names but a layer got a batch of 2 rows"):
            model(ids, attention_mask=mask, adapter_names=["lora"] * 3)
        with pytest.raises(TypeError, match="one per row"):
            model(ids, attention_mask=mask, adapter_names="lora")
        with pytest.raises(ValueError, match="empty"):
            model(ids, attention_mask=mask, adapter_names=[])


def test_what_cannot_be_routed_per_row_is_refused_with_the_reason():
    model = make_tl()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="pissa"), "pissa")
    ids, mask = batch(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="'pissa' cannot be used in a mixed batch: it changes the base tensor"):
            model(ids, attention_mask=mask, adapter_names=["a", "pissa"])
        dt.set_adapter(model, "pissa")  # its residual weight is in the base now
        with pytest.raises(ValueError, match="holds adapter 'pissa'"):
            model(ids, attention_mask=mask, adapter_names=["a", "__base__"])
        dt.set_adapter(model, "a")
        dt.merge(model)
        with pytest.raises(ValueError, match="'a' is merged into the base weights"):
            model(ids, attention_mask=mask, adapter_names=["a", "__base__"])
        dt.unmerge(model)
        model(ids, attention_mask=mask, adapter_names=["a", "__base__"])


def test_training_through_a_mixed_batch_updates_each_adapter_from_its_own_rows():
    configs = {k: v for k, v in layer_adapters("TL").items() if k in ("lora", "dora", "ia3", "pfeiffer", "copies")}
    configs.update({k: v for k, v in prompt_adapters().items() if k in ("prompt3", "prefix6")})
    model = build("TL", configs)
    dt.set_adapter(model, list(configs))  # all of them train
    names = ["lora", "prompt3", "__base__", "dora", "prefix6", "ia3", "lora", "pfeiffer", "copies"]
    ids, mask = batch(len(names))
    model.train()

    def row_losses(logits, rows):
        lg, y = logits[rows, :-1], ids[rows, 1:]
        keep = mask[rows, 1:].bool()
        return torch.nn.functional.cross_entropy(lg[keep], y[keep], reduction="sum")

    params = {n: list(dt.get_record(model, n).parameters(model)) for n in configs}
    model.zero_grad()
    row_losses(model(ids, attention_mask=mask, adapter_names=names).logits, list(range(len(names)))).backward()
    mixed = {n: [None if p.grad is None else p.grad.clone() for p in ps] for n, ps in params.items()}
    assert not any(p.grad is not None for n, p in model.named_parameters() if ".adapters." not in n
                   and "prompt_adapters" not in n)
    for n in configs:
        rows = [i for i, m in enumerate(names) if m == n]
        model.zero_grad()
        alone(model, n, lambda: row_losses(model(ids, attention_mask=mask).logits, rows)).backward()
        for p, g in zip(params[n], mixed[n]):
            assert p.grad is not None and g is not None, n
            assert maxdiff(g, p.grad) <= TOL * max(1.0, p.grad.abs().max().item()), n
            assert p.grad.abs().max() > 0, n
    model.eval()
