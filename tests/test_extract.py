"""Extracting a LoRA adapter from a fully fine-tuned model (``deltatune.extract_lora``, ``deltatune extract``).

The "fully fine-tuned" models are made here by changing a tiny model's weights: low-rank changes
(which a LoRA of that rank carries exactly: energy kept 1.0, outputs equal the tuned model's) and
full-rank noise (the truncated SVD keeps exactly the top singular values: the reported share and
the error are checked against the singular values computed independently).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

import deltatune as dt

from conftest import X_IDS, make_tg, make_tl, maxdiff, model_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def tuned_copy(base, rank=3, noise_on=(), norm_change=False, seed=0):
    """A copy of ``base`` whose linear layers (but the head) moved by a rank-``rank`` change, plus
    full-rank noise on the layers named in ``noise_on``, and a changed final norm when asked."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in tuned.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                o, i = mod.weight.shape
                mod.weight.add_(torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) * 0.05)
                if any(name.endswith(n) for n in noise_on):
                    mod.weight.add_(torch.randn(o, i, generator=g) * 0.02)
        if norm_change:
            tuned.model.norm.weight.add_(0.1)
    return tuned


def logits(model):
    with torch.no_grad():
        return model(torch.tensor(X_IDS)).logits


def test_a_low_rank_difference_is_extracted_exactly():
    base = make_tl()
    tuned = tuned_copy(base, rank=3)
    report = dt.extract_lora(base, tuned, 3)
    assert len(report.layers) == 14 and report.unchanged == [] and report.not_represented == {}
    assert all(abs(l.energy_kept - 1.0) < 1e-6 and l.rank == 3 for l in report.layers)
    assert maxdiff(logits(base), logits(tuned)) < 1e-4
    with dt.disable_adapter(base):
        assert maxdiff(logits(base), logits(tuned)) > 1e-2  # the adapter carries the change
    for l in report.layers:
        host, other = base.get_submodule(l.module), tuned.get_submodule(l.module)
        assert maxdiff(host.adapters["default"].delta_weight(host), other.weight - host.weight) < 1e-5


def test_truncation_keeps_the_top_singular_values_and_reports_their_share():
    base = make_tl()
    tuned = tuned_copy(base, rank=3, noise_on=("q_proj", "down_proj"), norm_change=True)
    report = dt.extract_lora(base, tuned, 2, "x")
    for l in report.layers:
        host, other = base.get_submodule(l.module), tuned.get_submodule(l.module)
        dw = (other.weight - host.weight).float()
        s = torch.linalg.svdvals(dw)
        assert abs(l.energy_kept - float((s[:2] ** 2).sum() / (s ** 2).sum())) < 1e-5
        err = (host.adapters["x"].delta_weight(host) - dw).norm()
        assert abs(float(err) - float((s[2:] ** 2).sum().sqrt())) < 1e-4  # Eckart-Young: the best rank 2
        assert l.energy_kept < 1.0
    assert 0 < report.energy_kept < 1
    assert set(report.not_represented) == {"model.norm.weight"}


def test_layers_smaller_than_the_rank_and_unchanged_layers(tmp_path):
    base = make_tg()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(torch.randn(32, 96) * 0.01)  # Conv1D, full rank
    report = dt.extract_lora(base, tuned, 64, target_modules=["c_attn", "c_proj"])
    assert [l.module for l in report.layers] == ["transformer.h.0.attn.c_attn"]
    assert report.layers[0].rank == 32 and abs(report.layers[0].energy_kept - 1) < 1e-6
    assert "transformer.h.1.attn.c_attn" in report.unchanged
    assert maxdiff(logits(base), logits(tuned)) < 1e-4
    dt.save_adapter(base, str(tmp_path / "x"))
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 64 and list(cfg["rank_pattern"].values()) == [32]
    pm = PeftModel.from_pretrained(make_tg(), str(tmp_path / "x"))
    assert maxdiff(logits(pm), logits(tuned)) < 1e-4


def test_bad_input_is_a_clear_error():
    base = make_tl()
    with pytest.raises(ValueError, match="positive integer"):
        dt.extract_lora(base, tuned_copy(base), 0)
    with pytest.raises(ValueError, match="no targeted layer differs"):
        dt.extract_lora(base, copy.deepcopy(base), 4)
    with pytest.raises(ValueError, match="shape"):
        dt.extract_lora(base, make_tl(intermediate_size=48), 4)
    assert dt.adapter_names(base) == []


def test_cli_extract_writes_an_adapter_and_its_report(tmp_path, capsys):
    from deltatune.cli import main

    base = make_tl()
    tuned = tuned_copy(base, rank=2, noise_on=("v_proj",))
    b, t = model_folder(tmp_path / "base", base), model_folder(tmp_path / "tuned", tuned)
    out = tmp_path / "lora"
    assert main(["extract", "--base", b, "--tuned", t, "--rank", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "extract_report.json").read_text())
    assert rep["rank"] == 2 and len(rep["layers"]) == 14 and 0 < rep["energy_kept"] < 1
    assert "energy kept" in capsys.readouterr().out
    fresh = make_tl()
    dt.load_adapter(fresh, str(out))
    exact = dt.extract_lora(make_tl(), tuned, 2)
    assert exact.energy_kept == pytest.approx(rep["energy_kept"], abs=1e-6)
    assert main(["extract", "--base", b, "--tuned", t, "--rank", "2", "--out", str(out)]) == 2  # --out exists
    assert main(["extract", "--base", b, "--tuned", str(tmp_path / "nope"), "--rank", "2", "--out",
                 str(tmp_path / "o2")]) == 2
    assert main(["extract", "--base", b, "--tuned", t, "--rank", "0", "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert err.count("deltatune: error:") == 3 and "positive integer" in err
