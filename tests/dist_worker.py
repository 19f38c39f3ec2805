"""One process of the 2-process runs of tests/test_distributed.py (not a test file itself).

``python tests/dist_worker.py JOB OUTDIR [ARGS]`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, as torchrun sets them; each process writes what it saw into
``OUTDIR/<JOB>-rank<R>.pt``. The shared pieces (the tiny model with its LoRA, the items, the trainer's
settings) are imported by the test too, for the single-process references.
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

from conftest import make_tl  # noqa: E402

PREFIX = [1, 3, 9, 10, 11, 12]  # every item starts with these 6 tokens (no target among them): a shared prefix


def make_items(n: int, seed: int = 0) -> list:
    """``n`` items of the tiny Llama's vocabulary: the shared prefix, a prompt of 1-6 tokens (no targets), an
    answer of 1-5 tokens (targets)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randint(6, 127) for _ in range(rng.randint(1, 6))]
        answer = [rng.randint(6, 127) for _ in range(rng.randint(1, 5))]
        ids = PREFIX + prompt + answer
        out.append({"input_ids": ids, "labels": [-100] * (len(PREFIX) + len(prompt)) + answer})
    return out


def lora_model(dtype=torch.float32, nf4: bool = False):
    """The tiny Llama (TL) with LoRA r=4 on every linear layer (random B, so that steps differ from the start);
    ``nf4``: its base linear weights quantized to torchao's NF4 first (QLoRA)."""
    from deltatune import LoraConfig, inject, quantize_base

    # NF4 under FSDP: each shard must hold whole scaler blocks (64 x 256 weights), so the NF4 model is wider
    model = (make_tl(seed=0, hidden_size=256, intermediate_size=512) if nf4 else make_tl(seed=0)).to(dtype)
    if nf4:
        quantize_base(model, backend="torchao", compute_dtype=dtype)
    torch.manual_seed(1)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    return model


NF4_LR = 5e-3  # the wider NF4 model: at 2e-2 Adam turns float noise of near-zero gradients into 2e-5 (one process too)
TRAIN = dict(lr=2e-2, warmup_steps=1, max_grad_norm=1.0, grad_accum=2, epochs=2, max_steps=5, seed=3)


def train(dist, batch_size: int, n_items: int, nf4: bool = False, dtype=torch.float32, **kw):
    """(losses, grad norms, targets, tokens, full trainable tensors, parameter dtypes) of a Trainer run of the
    tiny LoRA model (``dtype``: the base's; the adapters stay float32)."""
    from deltatune.train.loop import Trainer

    model = lora_model(dtype=dtype, nf4=nf4)
    dist.wrap(model)
    dist.broadcast_params(p for p in model.parameters() if p.requires_grad)
    t = Trainer(model, make_items(n_items), batch_size=batch_size, dist=dist, **{**TRAIN, **kw})
    t.fit()
    with dist.full_parameters(model):
        state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": [h.loss for h in t.history], "grad_norm": [h.grad_norm for h in t.history],
            "targets": [h.targets for h in t.history], "tokens": [h.tokens for h in t.history], "state": state,
            "types": sorted({type(p).__name__ for p in model.parameters()}),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def job_trainers(out: str, rank: int) -> dict:
    from deltatune.train import distributed

    base = distributed.setup("ddp")
    res = {}
    for strategy in ("ddp", "fsdp"):
        d = distributed.Dist(rank=base.rank, world=base.world, strategy=strategy, backend="gloo")
        # 19 items, combined batch 6: the last micro-batch of each epoch has 1 row, so rank 1's share is empty
        res[strategy] = train(d, 3, 19)
        res[strategy + "_fast"] = train(d, 3, 19, packing=True, shared_prefix=True)
    res["fsdp_nf4"] = train(d, 3, 19, nf4=True, lr=NF4_LR)
    for strategy in ("ddp", "fsdp"):  # a bf16 base with fp32 adapters: FSDP shards the mixed dtypes
        d = distributed.Dist(rank=base.rank, world=base.world, strategy=strategy, backend="gloo")
        res[strategy + "_bf16"] = train(d, 3, 19, dtype=torch.bfloat16)
    return res


def job_cli(out: str, rank: int, model_dir: str, data: str, strategy: str) -> dict:
    """``deltatune train`` in this process (``train_session``), counting the files each rank writes."""
    from deltatune.train import checkpoint, pipeline
    from deltatune.train.config import build_config

    writes = []
    real_save, real_report, real_new = pipeline.save_adapter, pipeline.write_report, checkpoint.write_new_file
    saving = lambda model, d, *a, **k: (writes.append(d), real_save(model, d, *a, **k))[1]  # noqa: E731
    pipeline.save_adapter = checkpoint.save_adapter = saving
    pipeline.write_report = lambda p, r: (writes.append(p), real_report(p, r))[1]
    checkpoint.write_new_file = lambda p, data: (writes.append(p), real_new(p, data))[1]
    cfg = build_config({}, cli_options(model_dir, data, os.path.join(out, f"cli-{strategy}"), 2,
                                       strategy=strategy))
    rep = pipeline.run_train(cfg, log=None, progress=False)
    return {"writes": writes, "report": rep}


def job_cli_stop(out: str, rank: int, model_dir: str, data: str, strategy: str) -> dict:
    """``deltatune train`` on these processes, every process leaving at once after the checkpoint of step 2
    (as a killed run does): the run folder is left to resume."""
    from deltatune.train import distributed, pipeline
    from deltatune.train.config import build_config

    real = distributed.SharedSaver.save

    def save_then_die(self, trainer):
        path = real(self, trainer)
        if trainer.step == 2:
            os._exit(0)
        return path

    distributed.SharedSaver.save = save_then_die
    cfg = build_config({}, cli_options(model_dir, data, os.path.join(out, f"stop-{strategy}"), 2, strategy=strategy))
    pipeline.run_train(cfg, log=None, progress=False)
    return {}


def job_resume(out: str, rank: int, run_dir: str, batch_size: str, strategy: str) -> dict:
    """``deltatune train --resume RUN_DIR --batch-size B --strategy S`` on these processes."""
    from deltatune.train import pipeline
    from deltatune.train.checkpoint import find_resume, resume_config

    resume = find_resume(run_dir)
    cfg = resume_config(resume, {}, {"batch_size": int(batch_size), "strategy": strategy, "progress": False})
    return {"report": pipeline.run_train(cfg, log=None, progress=False, resume=resume)}


def cli_options(model_dir: str, data: str, out: str, batch_size: int, **extra) -> dict:
    return dict(model=model_dir, data=data, out=out, batch_size=batch_size, max_steps=4, eval_size=4, eval_every=2,
                save_every=2, ppl_size=0, threads=1, progress=False, plot=False, val_fraction=0.2, precision="fp32",
                r=4, lora_alpha=8, lr=1e-2, grad_accum=2, **extra)


def job_die(out: str, rank: int) -> dict:
    """Rank 1 dies at the start of step 3; rank 0 must stop with a clear error, not hang."""
    from deltatune.train import distributed
    from deltatune.train.loop import Trainer

    d = distributed.setup("ddp")
    model = lora_model()

    def on_step(log):
        if rank == 1 and log.step == 2:
            os._exit(3)

    t = Trainer(model, make_items(40), batch_size=2, dist=d, on_step=on_step, **{**TRAIN, "max_steps": 8})
    try:
        t.fit()
    except distributed.DistributedError as e:
        return {"error": str(e)}
    return {"error": None}


JOBS = {"trainers": job_trainers, "cli": job_cli, "die": job_die, "cli_stop": job_cli_stop, "resume": job_resume}


if __name__ == "__main__":
    job, out, *args = sys.argv[1:]
    rank = int(os.environ["RANK"])
    result = JOBS[job](out, rank, *args)
    torch.save(result, os.path.join(out, f"{job}-rank{rank}.pt"))
