"""Scale-out (deltatune.train.distributed): 2 CPU processes on gloo give what one process gives with the
combined batch.

Each 2-process run starts two plain processes of tests/dist_worker.py with the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, a free MASTER_PORT) under a wall-clock limit, so that a hang
fails the test instead of blocking the suite. The single-process references run here, in the test
process, from the same pieces. Tolerance: 1e-5 absolute in float32 (losses, gradient norms, every
adapter tensor after the run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import dist_worker as W
from conftest import make_dv, make_tl, make_tt, model_folder
from deltatune.cli import main
from deltatune.train import distributed
from deltatune.train.config import UsageError, build_config
from deltatune.train.distributed import SINGLE, Dist
from deltatune.train.loop import plan_windows

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: str, out, *args, world: int = 2, timeout: float = 120, env_extra: dict | None = None) -> list:
    """Run ``dist_worker.py JOB`` in ``world`` processes; return their results (None for a process that wrote
    none) and their exit codes. A run past ``timeout`` seconds is killed and fails the test."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", **(env_extra or {}))
    src = os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for r in range(world):
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), job, str(out), *args],
                                      env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + timeout
    logs, codes = [], []
    try:
        for p in procs:
            o, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            logs.append(o)
            codes.append(p.returncode)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{job}: the {world} processes did not finish within {timeout} s (a hang)")
    results = []
    for r in range(world):
        path = os.path.join(str(out), f"{job}-rank{r}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    return results, codes, logs


def maxdiff_state(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def same_run(two: dict, one: dict) -> None:
    assert two["targets"] == one["targets"] and two["tokens"] == one["tokens"]  # global figures
    assert max(abs(x - y) for x, y in zip(two["loss"], one["loss"])) <= TOL
    assert max(abs(x - y) for x, y in zip(two["grad_norm"], one["grad_norm"])) <= TOL
    assert maxdiff_state(two["state"], one["state"]) <= TOL


# ----------------------------------------------------------------------------- no processes needed


def test_plan_of_two_processes_is_the_plan_of_one_with_the_combined_batch():
    one = plan_windows(19, 6, 2, 2, 3, 5)
    for world in (2, 3):
        shards = [[[Dist(rank=r, world=world).shard(mb) for mb in w] for w in plan_windows(19, 6 // world * world, 2, 2,
                                                                                             3, 5)] for r in range(world)]
        for i, window in enumerate(one):
            for j, mb in enumerate(window):
                assert sorted(sum((shards[r][i][j] for r in range(world)), [])) == sorted(mb)
    assert Dist(rank=1, world=2).shard([7]) == []  # a short last micro-batch: rank 1's share is empty


def test_strategy_needs_several_processes(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("auto") is SINGLE
    for s in ("ddp", "fsdp"):
        with pytest.raises(UsageError, match=f"--strategy {s} needs more than one process.*torchrun --nproc-per-node"):
            distributed.setup(s)
    model_dir = model_folder(tmp_path / "tl", make_tl(), make_tt())
    data = tmp_path / "dv.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in make_dv(8)))
    base = ["train", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]
    capsys.readouterr()  # (the model folder's writing bar)
    for extra, needle in ((["--strategy", "fsdp"], "--strategy fsdp needs more than one process"),
                          (["--strategy", "zero3"], "option 'strategy' must be one of auto, ddp, fsdp")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_a_run_of_several_tasks_refuses_several_processes(monkeypatch, tmp_path, capsys):
    data = tmp_path / "dv.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in make_dv(8)))
    argv = ["train", "--data", f"a={data}", "--data", f"b={data}", "--out", str(tmp_path / "o"), "--no-progress"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs in one process: start it without torchrun" in err, err
    assert not (tmp_path / "o").exists()


def test_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(UsageError, match="DELTATUNE_DIST_TIMEOUT='soon' must be a number of seconds"):
        distributed.timeout_seconds()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_seconds() == 12.5


def test_fsdp_refuses_what_it_cannot_shard_in_one_line():
    from deltatune import AdaLoraConfig, LoraConfig, PromptTuningConfig, inject, quantize_base

    m = make_tl()
    inject(m, LoraConfig(r=4, target_modules="all-linear"))
    distributed.check_fsdp(m, "lora", "bf16", False)  # fine
    with pytest.raises(UsageError, match="--method full"):
        distributed.check_fsdp(m, "full", "bf16", True)
    with pytest.raises(UsageError, match="--precision fp16"):
        distributed.check_fsdp(m, "lora", "fp16", False)
    m = make_tl()
    inject(m, AdaLoraConfig(r=4, target_modules=["q_proj"], total_step=10))
    with pytest.raises(UsageError, match="--method adalora.*use --strategy ddp"):
        distributed.check_fsdp(m, "adalora", "fp32", False)
    m = make_tl()
    inject(m, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(UsageError, match="virtual tokens"):
        distributed.check_fsdp(m, "prompt_tuning", "fp32", False)
    m = make_tl()  # TL's 32 x 32 projections hold one NF4 scaler block: not cut in two
    quantize_base(m, backend="torchao")
    with pytest.raises(UsageError, match="cannot cut the NF4 weight of .* into 2 equal shards"):
        distributed.check_fsdp(m, "qlora", "fp32", False, 2)
    pytest.importorskip("bitsandbytes")
    m = make_tl()
    try:
        quantize_base(m, backend="bitsandbytes")
    except Exception as e:  # pragma: no cover - a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot quantize here: {e}")
    with pytest.raises(UsageError, match="cannot shard the bitsandbytes 4-bit base.*quant_backend=torchao"):
        distributed.check_fsdp(m, "qlora", "fp32", False)


# ----------------------------------------------------------------------------- 2 processes on gloo


def test_ddp_and_fsdp_on_two_processes_equal_one_process_with_the_combined_batch(tmp_path):
    """19 items, 3 per process (6 combined), 2 micro-batches per step, 5 steps over 2 epochs: the short last
    micro-batch of an epoch leaves rank 1 nothing (DDP: zero gradient; FSDP: a row with weight 0). Padded rows,
    and the fast path's packed rows + shared prefix (FSDP: packed rows); FSDP also with a torchao NF4 base, and
    with a bf16 base under fp32 adapters (against DDP on the same rows: bf16 rounds another batch split
    differently, so the one-process reference is for float32)."""
    (r0, r1), codes, logs = launch("trainers", tmp_path)
    assert codes == [0, 0], logs[0][-3000:]
    padded, fast = W.train(SINGLE, 6, 19), W.train(SINGLE, 6, 19, packing=True, shared_prefix=True)
    for key, one in (("ddp", padded), ("fsdp", padded), ("ddp_fast", fast), ("fsdp_fast", fast)):
        same_run(r0[key], one)
        assert maxdiff_state(r0[key]["state"], r1[key]["state"]) == 0.0  # every process ends with the same adapter
    assert r0["fsdp"]["types"] == ["DTensor"] and r0["ddp"]["types"] == ["Parameter"]  # FSDP really sharded
    same_run(r0["fsdp_nf4"], W.train(SINGLE, 6, 19, nf4=True, lr=W.NF4_LR))  # QLoRA base sharded
    # a bf16 base with fp32 adapters: FSDP (mixed dtypes in one unit) computes what DDP computes, rows for rows
    assert r0["fsdp_bf16"]["dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert r0["fsdp_bf16"]["targets"] == padded["targets"]
    assert maxdiff_state(r0["fsdp_bf16"]["state"], r0["ddp_bf16"]["state"]) <= TOL
    assert max(abs(x - y) for x, y in zip(r0["fsdp_bf16"]["loss"], r0["ddp_bf16"]["loss"])) <= TOL


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model_dir = model_folder(root / "tl", make_tl(), make_tt())
    data = root / "dv.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in make_dv(24)))
    one = root / "one"
    from deltatune.train.pipeline import run_train

    rep = run_train(build_config({}, W.cli_options(model_dir, str(data), str(one), 4)), log=None, progress=False)
    return root, model_dir, str(data), str(one), rep


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_train_command_on_two_processes_saves_the_one_process_adapter_from_rank_0(tiny_run, strategy):
    from peft import PeftModel
    from safetensors.torch import load_file

    root, model_dir, data, one, one_rep = tiny_run
    (r0, r1), codes, logs = launch("cli", root, model_dir, data, strategy)
    assert codes == [0, 0], logs[0][-3000:]
    out = os.path.join(root, f"cli-{strategy}")
    assert r1["writes"] == []  # rank 1 writes nothing
    names = [os.path.basename(w) for w in r0["writes"]]  # rank 0: checkpoints at steps 2 and 4, the adapter, the report
    assert names.count("state.json") == 2 and names[-2:] == [os.path.basename(out), "report.json"], names
    two, ref = load_file(os.path.join(out, "adapter_model.safetensors")), load_file(os.path.join(one, "adapter_model.safetensors"))
    assert maxdiff_state(two, ref) <= TOL  # whole tensors (same names and shapes), the one-process values
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["processes"] == 2 and rep["strategy"] == strategy and len(rep["peak_rss_bytes_per_process"]) == 2
    assert rep["train_tokens"] == one_rep["train_tokens"] and abs(rep["final_loss"] - one_rep["final_loss"]) <= TOL
    assert rep["metric_before"] == one_rep["metric_before"] and rep["eval_examples"] == one_rep["eval_examples"]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    ref_rows = [json.loads(x) for x in open(os.path.join(one, "metrics.jsonl"))]
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in ref_rows]
    assert [r.get("targets") for r in rows] == [r.get("targets") for r in ref_rows]
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))
    # the file in the real peft, in a single process
    pm = PeftModel.from_pretrained(make_tl(), out)
    got = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert len(got) == len(two)
    for k, v in two.items():
        pk = k.replace(".weight", ".default.weight")
        assert torch.equal(got[pk], v), k


def test_a_process_that_dies_stops_the_others_with_one_clear_line(tmp_path):
    t0 = time.time()
    (r0, r1), codes, logs = launch("die", tmp_path, env_extra={distributed.TIMEOUT_ENV: "60"}, timeout=90)
    assert codes[1] == 3 and r1 is None
    assert codes[0] == 0 and r0 is not None, logs[0][-3000:]
    msg = r0["error"]
    assert msg.startswith("process 0 of 2 lost contact with the others while") and "\n" not in msg
    assert time.time() - t0 < 60  # the closed connection is noticed, not the timeout waited out


def test_resume_on_another_number_of_processes_ends_with_the_one_process_adapter(tiny_run, monkeypatch, capsys):
    """A 2-process FSDP run (2 per process) stopped after the checkpoint of step 2 resumes in one process
    (--batch-size 4); a 1-process run stopped there resumes on 2 DDP processes (--batch-size 2). Both end
    with the adapter of the uninterrupted 1-process run; the wrong batch split is one line naming the fix."""
    from safetensors.torch import load_file

    from deltatune.train import checkpoint
    from deltatune.train.pipeline import run_train

    root, model_dir, data, one, _ = tiny_run
    ref = load_file(os.path.join(one, "adapter_model.safetensors"))
    # 2 processes -> 1
    _, codes, logs = launch("cli_stop", root, model_dir, data, "fsdp")
    assert codes == [0, 0], logs[0][-3000:]
    two = os.path.join(root, "stop-fsdp")
    assert "checkpoint-2" in os.listdir(two) and "report.json" not in os.listdir(two)
    capsys.readouterr()
    assert main(["train", "--resume", two, "--no-progress"]) == 2  # batch 2 on 1 process: another plan
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size is 4 in the checkpoint but 2 here (counted over all processes" in err
    assert main(["train", "--resume", two, "--batch-size", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert maxdiff_state(load_file(os.path.join(two, "adapter_model.safetensors")), ref) <= TOL
    # 1 process -> 2
    alone = os.path.join(root, "stop-one")
    real = checkpoint.Checkpointer.save

    def save_then_stop(self, trainer):
        path = real(self, trainer)
        if trainer.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(checkpoint.TrainingInterrupted):
        run_train(build_config({}, W.cli_options(model_dir, data, alone, 4)), log=None, progress=False)
    monkeypatch.undo()
    (r0, r1), codes, logs = launch("resume", root, alone, "2", "ddp")
    assert codes == [0, 0], logs[0][-3000:]
    assert r0["report"]["processes"] == 2
    assert maxdiff_state(load_file(os.path.join(alone, "adapter_model.safetensors")), ref) <= TOL
