"""A deltatune-adapted model under transformers' Trainer and TRL's SFTTrainer (passed as the model,
no peft_config): gradient checkpointing and accumulation, PEFT-format checkpoints and final saves
that the real peft loads, and the trainers' own resume (``adapter_trainer``). Also the adapted
model's own ``save_pretrained`` (adapter, or merged model when asked)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import emulate_training, make_dv, make_tl, make_tt, maxdiff
from deltatune.integrations.hf_trainer import adapter_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.tensor([[5, 17, 42, 9, 63, 2, 11]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def adapted(seed: int = 0, **kw):
    """TL with a LoRA whose B starts non-zero (gaussian init drawn from ``seed``)."""
    m = make_tl()
    torch.manual_seed(seed)
    dt.inject(m, dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian", **kw))
    return m


def logits(model, ids=X):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_values(model) -> dict:
    return {k: v.detach().clone() for k, v in dt.adapter_state_dict(model).items()}


def base_values(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in f".{k}."}


def largest_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(maxdiff(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the model's save_pretrained


def test_save_pretrained_writes_the_peft_adapter_that_peft_loads(tmp_path):
    from peft import PeftModel

    m = adapted()
    emulate_training(m)
    m.save_pretrained(str(tmp_path / "a"))
    assert set(os.listdir(tmp_path / "a")) == ADAPTER_FILES  # no model.safetensors that would lose the adapter
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mine = dt.adapter_state_dict(m)
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)
    theirs = PeftModel.from_pretrained(make_tl(), str(tmp_path / "a"))
    assert maxdiff(logits(theirs), logits(m)) < 1e-6
    assert maxdiff(logits(theirs), logits(make_tl())) > 1e-3  # the adapter does change the output


def test_save_pretrained_merged_writes_the_plain_model_and_leaves_the_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    m = adapted()
    emulate_training(m)
    before = logits(m)
    m.save_pretrained(str(tmp_path / "m"), merged=True)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any(".adapters." in k or "lora" in k for k in tensors)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert maxdiff(logits(plain), before) < 1e-5
    # the model in memory is as it was: adapter attached, not merged, save_pretrained still the adapter's
    assert dt.adapter_names(m) == ["default"] and dt.merged_adapters(m) == []
    assert torch.equal(logits(m), before)
    m.save_pretrained(str(tmp_path / "again"))
    assert set(os.listdir(tmp_path / "again")) == ADAPTER_FILES


def test_save_pretrained_is_the_class_method_again_without_adapters(tmp_path):
    m = adapted()
    assert "save_pretrained" in m.__dict__
    dt.delete_adapter(m, "default")
    assert "save_pretrained" not in m.__dict__
    m.save_pretrained(str(tmp_path / "plain"))
    assert "model.safetensors" in os.listdir(tmp_path / "plain")


def test_save_pretrained_layout_of_several_adapters(tmp_path):
    m = adapted()
    dt.inject(m, dt.LoraConfig(r=2, target_modules=["q_proj"]), "second")
    m.save_pretrained(str(tmp_path / "all"))
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "all"))
    assert set(os.listdir(tmp_path / "all" / "second")) == ADAPTER_FILES
    with open(tmp_path / "all" / "second" / "adapter_config.json") as fh:
        assert json.load(fh)["r"] == 2
    m.save_pretrained(str(tmp_path / "one"), selected_adapters=["second"])
    assert set(os.listdir(tmp_path / "one")) == ADAPTER_FILES
    with open(tmp_path / "one" / "adapter_config.json") as fh:
        assert json.load(fh)["r"] == 2


def test_save_pretrained_refusals(tmp_path):
    m = adapted()
    with pytest.raises(ValueError, match="never uploads"):
        m.save_pretrained(str(tmp_path / "x"), push_to_hub=True)
    with pytest.raises(TypeError, match="merged=True"):
        m.save_pretrained(str(tmp_path / "x"), repo_id="me/x")
    with pytest.raises(KeyError, match="nope"):
        m.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])
    p = make_tl()
    dt.inject(p, dt.PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="cannot be merged"):
        p.save_pretrained(str(tmp_path / "y"), merged=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- transformers.Trainer


def lm_dataset(n=16, T=12, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(6, 128, (T,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * T, "labels": ids})
    return Dataset.from_list(rows)


def trainer_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=4,
                learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, save_strategy="steps",
                save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def train_hf(out, model_seed=0, resume=None, cls=None, **kw):
    from transformers import Trainer

    m = adapted(model_seed)
    base = base_values(m)
    t = (cls or adapter_trainer(Trainer))(model=m, args=trainer_args(out, **kw), train_dataset=lm_dataset(),
                                          eval_dataset=lm_dataset(8, seed=1))
    t.train(resume_from_checkpoint=resume)
    return m, t, base


def test_trainer_accumulation_and_checkpointing_train_the_adapter_alone(tmp_path):
    init = adapter_values(adapted(0))
    plain, _, base = train_hf(tmp_path / "plain")
    split, _, _ = train_hf(tmp_path / "split", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           gradient_checkpointing=True)
    a, b = adapter_values(plain), adapter_values(split)
    assert largest_diff(a, init) > 1e-3  # the adapter trained ...
    assert largest_diff(a, b) < 1e-5  # ... and 2 x 2 accumulated with checkpointing = 4 x 1
    assert all(torch.equal(v, base[k]) for k, v in base_values(plain).items())  # the base never moved
    assert all(torch.equal(v, base[k]) for k, v in base_values(split).items())


def test_trainer_checkpoints_and_save_model_are_peft_adapters_and_resume_restores_them(tmp_path):
    from peft import PeftModel

    full, trainer, _ = train_hf(tmp_path / "run")
    for step in (2, 4):
        files = set(os.listdir(tmp_path / "run" / f"checkpoint-{step}"))
        assert ADAPTER_FILES <= files and not any(f.startswith("model") for f in files)
    final = adapter_values(full)
    saved = load_file(str(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors"))
    assert largest_diff(saved, final) == 0.0
    trainer.save_model(str(tmp_path / "final"))
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "final"))
    theirs = PeftModel.from_pretrained(make_tl(), str(tmp_path / "final"))
    assert maxdiff(logits(theirs), logits(full)) < 1e-6
    # resume at step 2 on an adapter initialised differently: the checkpoint's values are restored,
    # so the last two steps give the uninterrupted run's adapter
    resumed, _, _ = train_hf(tmp_path / "resumed", model_seed=5, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert largest_diff(adapter_values(resumed), final) < 1e-6
    assert largest_diff(adapter_values(adapted(5)), final) > 1e-2


def test_plain_trainer_cannot_resume_an_adapter_checkpoint(tmp_path):
    from transformers import Trainer

    train_hf(tmp_path / "run", max_steps=2)
    with pytest.raises(ValueError, match="checkpoint"):
        train_hf(tmp_path / "again", cls=Trainer, resume=str(tmp_path / "run" / "checkpoint-2"))


def test_trainer_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    m, t, _ = train_hf(tmp_path / "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=False)
    best = t.state.best_model_checkpoint
    assert best is not None and os.path.isdir(best)
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    assert largest_diff(saved, adapter_values(m)) == 0.0
    losses = {h["step"]: h["eval_loss"] for h in t.state.log_history if "eval_loss" in h}
    assert best.endswith(f"checkpoint-{min(losses, key=losses.get)}")


# ----------------------------------------------------------------------------- trl.SFTTrainer


def sft_rows():
    # TRL joins prompt and completion as strings: the completion starts with a space (TT splits on spaces)
    return [{"prompt": c[0]["content"], "completion": " " + c[1]["content"]} for c in make_dv(16)]


def train_sft(out, model_seed=0, resume=None, **kw):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    m = adapted(model_seed)
    base = base_values(m)
    args = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                gradient_checkpointing=True, max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant",
                warmup_steps=0, save_steps=2, logging_steps=1, report_to=[], use_cpu=True, max_length=32, seed=0,
                data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
                bf16=False)  # SFTConfig's default bf16 autocast would stay on the model's forward afterwards
    args.update(kw)
    t = adapter_trainer(SFTTrainer)(model=m, args=SFTConfig(**args), train_dataset=Dataset.from_list(sft_rows()),
                                    processing_class=make_tt())
    t.train(resume_from_checkpoint=resume)
    return m, t, base


def test_sft_trainer_trains_saves_peft_adapters_and_resumes(tmp_path):
    from peft import PeftModel

    init = adapter_values(adapted(0))
    m, t, base = train_sft(tmp_path / "run")
    final = adapter_values(m)
    assert largest_diff(final, init) > 1e-3
    assert all(torch.equal(v, base[k]) for k, v in base_values(m).items())
    files = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert ADAPTER_FILES <= files and not any(f.startswith("model") for f in files)
    t.save_model(str(tmp_path / "final"))
    theirs = PeftModel.from_pretrained(make_tl(), str(tmp_path / "final"))
    assert maxdiff(logits(theirs), logits(m)) < 1e-6
    resumed, _, _ = train_sft(tmp_path / "resumed", model_seed=5, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert largest_diff(adapter_values(resumed), final) < 1e-6
