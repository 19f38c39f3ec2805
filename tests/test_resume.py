"""Crash-safe training: the trainer's state round trip, checkpoints, ``deltatune train --resume``.

* ``Trainer.state_dict()`` through a checkpoint's files (safetensors + JSON) into a fresh trainer gives
  the uninterrupted run's adapter bit for bit (fp32, one thread), for the plain loop, dropout (RNG),
  accumulation over epochs, weight decay, the fast path (bf16 + packed rows + shared prefix) and two
  adapters trained at once;
* checkpoints on disk: complete or absent, the last K kept, removed when the run finishes, never
  deleted by ``--overwrite`` while the run is unfinished;
* SIGINT on a real ``deltatune train`` process: a checkpoint, exit code 130, one line saying how to
  resume; the resumed run ends as the uninterrupted one;
* SIGKILL at 20 seeded random moments (timers from outside, and kills inside the process at the
  k-th write, rename, fsync, delete or forward pass: during checkpoint writes too), resuming each
  time: never a partial file under a real name, and the final adapter, metrics and report equal the
  uninterrupted run's;
* ``--resume`` refuses, in one line naming the field, a checkpoint of another configuration or data;
* a non-finite loss or gradient: the step is not taken, the message names it, the last good
  checkpoint stays.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import deltatune as dt
from conftest import make_dv, make_tl, make_tt, model_folder
from deltatune._io import TMP_PREFIX, is_temporary
from deltatune.cli import main
from deltatune.formats.peft import read_adapter_tensors
from deltatune.train.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    Checkpointer,
    complete_checkpoints,
    flatten_state,
    read_checkpoint,
    unflatten_state,
)
from deltatune.train.data import ChatEncoder, Example
from deltatune.train.loop import NonFiniteLoss, Trainer
from deltatune.train.outputs import CHECKPOINT_RE, OUTPUT_MARKER, read_marker
from deltatune.train.precision import Precision

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the trainer's state


def _items(n=12, seed=0):
    tok = make_tt()
    enc = ChatEncoder(tok)
    return [enc.encode(Example(messages=m)) for m in make_dv(n, seed=seed)]


def _model(variant):
    m = make_tl(attention_dropout=0.1 if variant == "dropout" else 0.0)
    torch.manual_seed(0)
    if variant == "two_adapters":
        dt.inject(m, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        dt.inject(m, dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "second")
        dt.set_adapter(m, ["default", "second"])  # both act, both train
    else:
        dt.inject(m, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                   lora_dropout=0.2 if variant == "dropout" else 0.0))
    return m


TRAINERS = {
    "plain": dict(max_steps=7),
    "dropout": dict(max_steps=7),
    "accumulation_epochs": dict(batch_size=3, grad_accum=2, epochs=3, weight_decay=0.1, schedule="constant",
                                warmup_steps=2),
    "fast_path_bf16": dict(max_steps=7, packing=True, shared_prefix=True, precision=Precision(torch.device("cpu"),
                                                                                                torch.bfloat16)),
    "two_adapters": dict(max_steps=7),
}


def _trainer(variant, model):
    kw = {"lr": 1e-2, "batch_size": 4, "warmup_steps": 3, "max_grad_norm": 1.0, "seed": 3, **TRAINERS[variant]}
    return Trainer(model, _items(), pad_id=0, **kw)


def _through_files(state, tmp_path):
    """The state as a checkpoint stores it: safetensors bytes + JSON text, read back."""
    from safetensors.torch import load, save

    js, tensors = flatten_state(state)
    blob, text = save(tensors), json.dumps(js)
    (tmp_path / "s.safetensors").write_bytes(blob)
    return unflatten_state(json.loads(text), load(blob))


@pytest.mark.parametrize("variant", sorted(TRAINERS))
def test_a_resumed_trainer_ends_with_the_uninterrupted_adapter_bit_for_bit(variant, tmp_path):
    full = _trainer(variant, _model(variant))
    full.fit()
    want = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}
    assert full.total_steps >= 6

    for cut in (1, full.total_steps // 2 + 1):
        first = _trainer(variant, _model(variant))
        first.plan = first.plan[:cut]  # the process "dies" after `cut` steps
        first.fit()
        state = _through_files(first.state_dict(), tmp_path)
        random.random(), torch.rand(3)  # the new process's RNG states are anything
        second = _trainer(variant, _model(variant))
        assert second.step == 0
        second.load_state_dict(state)
        assert second.step == cut and len(second.plan) == full.total_steps
        second.fit()
        got = {n: p.detach() for n, p in second.model.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys()
        for n in want:
            assert torch.equal(got[n], want[n]), (variant, cut, n)
        assert [h.loss for h in second.history] == [h.loss for h in full.history[cut:]]
        assert second.train_tokens == full.train_tokens
        assert second.scheduler.last_epoch == full.scheduler.last_epoch == full.total_steps


def test_a_resumed_trainer_keeps_its_own_optimizer_kernel(tmp_path):
    """A checkpoint's param groups carry the kernel its run used (``fused``/``foreach``: another
    version, or unsharded tensors); the resumed trainer keeps the one it chose for its own tensors
    (fused AdamW on plain CPU tensors) and still ends with the uninterrupted adapter."""
    full = _trainer("plain", _model("plain"))
    full.fit()
    want = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}
    first = _trainer("plain", _model("plain"))
    first.plan = first.plan[:2]
    first.fit()
    state = _through_files(first.state_dict(), tmp_path)
    for g in state["optimizer"]["param_groups"]:
        g["fused"], g["foreach"] = None, True  # as an older run of per-tensor kernels saved them
    second = _trainer("plain", _model("plain"))
    second.load_state_dict(state)
    assert all(g["fused"] is True and g["foreach"] is None for g in second.optimizer.param_groups)
    second.fit()
    for n, p in second.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), want[n]), n


def test_each_part_of_the_state_matters():
    """Dropping the optimizer's moments, the RNG state or the scheduler changes the result: the state
    round trip above is not passing by chance."""
    def run(drop):
        first = _trainer("dropout", _model("dropout"))
        first.plan = first.plan[:3]
        first.fit()
        state = first.state_dict()
        second = _trainer("dropout", _model("dropout"))
        if drop == "optimizer":
            state["optimizer"] = second.optimizer.state_dict() | {"param_groups": state["optimizer"]["param_groups"]}
        elif drop == "rng":
            state["rng"]["torch"] = torch.random.manual_seed(123).get_state()
        elif drop == "scheduler":
            state["scheduler"] = second.scheduler.state_dict()
        second.load_state_dict(state)
        second.fit()
        return {n: p.detach().clone() for n, p in second.model.named_parameters() if p.requires_grad}

    ok = run(None)
    for part in ("optimizer", "rng", "scheduler"):
        bad = run(part)
        assert any(not torch.equal(ok[n], bad[n]) for n in ok), part


def test_state_of_another_plan_or_model_is_refused():
    state = _trainer("plain", _model("plain")).state_dict()
    other = Trainer(_model("plain"), _items(), pad_id=0, batch_size=4, max_steps=7, seed=4)
    with pytest.raises(ValueError, match="seed 3 there, 4 here"):
        other.load_state_dict(state)
    other = _trainer("two_adapters", _model("two_adapters"))
    with pytest.raises(ValueError, match="other trainable tensors"):
        other.load_state_dict(state)


def test_state_dict_holds_tensors_and_plain_values_only():
    tr = _trainer("fast_path_bf16", _model("plain"))
    tr.plan = tr.plan[:2]
    tr.fit()
    js, tensors = flatten_state(tr.state_dict())
    text = json.dumps(js, allow_nan=False)  # plain JSON
    assert "exp_avg" in text and '"step": 2' in text
    assert {k.split(".")[1] for k in tensors} == {"params", "optimizer", "rng"}
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert tensors["s.rng.torch"].dtype == torch.uint8 and tensors["s.rng.python.state"].numel() == 625


# ----------------------------------------------------------------------------- a tiny model folder and runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = model_folder(root / "tl", make_tl(), make_tt())
    data = root / "dv.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in make_dv(40)))
    return model_dir, str(data)


def train_argv(tiny, out, *extra, steps=40):
    """The runs of these tests; ``extra`` flags replace the same flags here, or come after them."""
    model_dir, data = tiny
    argv = ["train", "--model", model_dir, "--data", data, "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--eval-size", "4", "--eval-every", "7", "--ppl-size", "0", "--threads", "1",
            "--precision", "fp32", "--no-progress", "--no-plot", "--val-fraction", "0.1", "--save-every", "1",
            "--lora-dropout", "0.1"]
    extra, more = list(extra), []
    while extra:
        flag = extra.pop(0)
        if flag in argv and extra and not extra[0].startswith("--"):
            argv[argv.index(flag) + 1] = extra.pop(0)
        else:
            more.append(flag)
    return argv + more


def run_cli(capfd, *argv):
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def adapter_of(folder):
    return read_adapter_tensors(str(folder))


def assert_same_adapter(a, b):
    ta, tb = adapter_of(a), adapter_of(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


RESULT_FIELDS = ("metric_before", "metric_after", "eval_loss_before", "eval_loss_after", "final_loss", "steps",
                 "train_tokens", "metric_by_form", "eval_examples")
ROW_FIELDS = ("kind", "step", "loss", "lr", "grad_norm", "targets", "tokens", "metric", "eval_loss", "n")


def assert_same_run(a, b):
    """Same adapter (bit for bit), report results and metrics rows (timings aside)."""
    assert_same_adapter(a, b)
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert {k: ra[k] for k in RESULT_FIELDS} == {k: rb[k] for k in RESULT_FIELDS}
    rows = [[{k: r.get(k) for k in ROW_FIELDS} for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]
            for p in (a, b)]
    assert rows[0] == rows[1]


def assert_whole(out):
    """Every entry under a real name in a run folder is whole; only deltatune's temporary names may hold
    a partial file. Returns the complete checkpoints' steps."""
    from safetensors.torch import load_file

    steps = []
    for name in sorted(os.listdir(out)):
        p = os.path.join(out, name)
        if is_temporary(name):
            continue
        if CHECKPOINT_RE.fullmatch(name):
            assert sorted(os.listdir(p)) == sorted(["adapter_config.json", "adapter_model.safetensors", STATE_JSON,
                                                     STATE_TENSORS]), name
            state, run = read_checkpoint(p)
            assert state["step"] == int(name.split("-")[1]) and run["fingerprint"]
            json.load(open(os.path.join(p, "adapter_config.json")))
            assert adapter_of(p)
            steps.append(state["step"])
        elif name.endswith(".json"):
            json.load(open(p))
        elif name.endswith(".safetensors"):
            load_file(p)
        elif name == "metrics.jsonl":
            data = open(p, "rb").read()
            assert not data or data.endswith(b"\n"), "a half-written line"
            [json.loads(line) for line in data.splitlines()]
        elif name.endswith(".png"):
            data = open(p, "rb").read()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
        else:
            raise AssertionError(f"unexpected entry {name}")
    return steps


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run (40 steps, checkpoints every step), in a forked process as the runs it is
    compared with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    pid = _spawn(train_argv(tiny, out), str(out) + ".log")
    assert _wait(pid) == 0, open(str(out) + ".log").read()
    return out


# ----------------------------------------------------------------------------- processes


def _spawn(argv, log, kill_at=None):
    """``deltatune train`` in a forked process (this one has imported everything: it starts in a fraction
    of a second), its output into ``log``; ``kill_at``: (what, k) the process SIGKILLs itself at the
    k-th such event (see :func:`_arm`)."""
    open(log, "w").close()
    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        torch.set_num_threads(1)
        if kill_at:
            _arm(*kill_at)
        code = main(argv)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _wait(pid, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the process did not end")


def _arm(what, k):
    """In the child: SIGKILL itself at the k-th event of kind ``what``: ``write`` (a write to a
    temporary file is cut half-way first), ``fsync``, ``replace`` (before the rename), ``unlink`` /
    ``rmdir`` (a folder being deleted), ``step`` (a forward pass of a training step)."""
    import deltatune.train.loop as loop

    count = [0]

    def hit():
        count[0] += 1
        return count[0] == k

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name):
        orig = getattr(os, name)

        def f(*a, **kw):
            if hit():
                if name == "write":
                    fd, data = a
                    if is_temporary(os.readlink(f"/proc/self/fd/{fd}")) and len(data) > 1:
                        orig(fd, bytes(data[: len(data) // 2]))  # half of a file being written
                die()
            return orig(*a, **kw)

        setattr(os, name, f)

    for name in what.split("+"):
        if name != "step":
            wrap(name)
            continue
        orig = loop.token_loss_sum

        def step(*a, **kw):
            if hit():
                die()
            return orig(*a, **kw)

        loop.token_loss_sum = step


def _finished(out):
    body = read_marker(out)
    return body is not None and body.get("status") == "finished"


def test_sigkill_at_20_random_moments_then_resume_gives_the_uninterrupted_run(tiny, reference, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(20261202)
    kinds = (["event"] * 12 + ["timer_start"] * 4 + ["timer_train"] * 4)
    rng.shuffle(kinds)
    events = ["write", "fsync", "replace", "unlink+rmdir", "step", "write+fsync+replace+unlink+rmdir+step"]
    kills, checkpoints_seen, resumed_from = [], set(), []
    argv = train_argv(tiny, out)
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    per_step = rows[-2]["elapsed_s"] / rows[-2]["step"]  # a step with its checkpoint, on this machine now
    startup = json.loads((reference / "report.json").read_text())["wall_seconds"] - rows[-2]["elapsed_s"]
    for i, kind in enumerate(kinds):
        log = str(tmp_path / f"attempt{i}.log")
        started = read_marker(out) is not None  # else the user runs the command again
        args = ["train", "--resume", str(out), "--threads", "1", "--no-progress"] if started else argv
        if kind == "event":
            what = rng.choice(events)
            # a step with its checkpoint is about 38 events: 15 fsync, 8 write, 7 replace, 6 unlink/rmdir, 1 step
            k = rng.randint(1, {"step": 3, "write": 16, "fsync": 30, "replace": 14, "unlink+rmdir": 12}.get(what, 80))
            pid = _spawn(args, log, (what, k))
        else:
            pid = _spawn(args, log)
            if kind == "timer_train":  # after the run reached its training loop
                t0 = time.time()
                while "training:" not in open(log).read() and time.time() - t0 < 60:
                    time.sleep(0.005)
            time.sleep(rng.uniform(0.0, startup if kind == "timer_start" else 3 * per_step))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = _wait(pid)
        assert code in (-signal.SIGKILL, 0), (i, kind, code, open(log).read()[-2000:])
        assert not _finished(out) or code == 0
        if code == 0:
            break
        kills.append(kind if kind != "event" else f"{what}#{k}")
        if os.path.isdir(out):
            checkpoints_seen.update(assert_whole(out))
        text = open(log).read()
        if "resuming from" in text:
            resumed_from.append(text.split("resuming from ")[1].split()[0])
    assert len(kills) == 20, kills  # every kill landed before the run was done
    code = _wait(_spawn(["train", "--resume", str(out), "--threads", "1", "--no-progress"], str(tmp_path / "last.log")))
    assert code == 0, open(tmp_path / "last.log").read()[-2000:]
    assert _finished(out) and resumed_from and len(checkpoints_seen) > 5
    assert sorted(os.listdir(out)) == sorted(["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl",
                                              "report.json", OUTPUT_MARKER])  # no checkpoint, nothing temporary
    assert_whole(out)
    assert_same_run(out, reference)


def _snapshot(folder):
    """{relative path: (size, mtime_ns, bytes hash)} of everything under ``folder``."""
    import hashlib

    snap = {}
    for root, dirs, files in os.walk(folder):
        for n in files + dirs:
            p = os.path.join(root, n)
            st = os.lstat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else "dir"
            snap[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, digest)
    return snap


@pytest.fixture(scope="module")
def interrupted(tiny, tmp_path_factory):
    """A run killed (SIGKILL) during its 5th step: checkpoints 1-4 were written, the last one kept."""
    out = tmp_path_factory.mktemp("int") / "run"
    code = _wait(_spawn(train_argv(tiny, out), str(out) + ".log", ("step", 5)))
    assert code == -signal.SIGKILL
    assert [s for s, _ in complete_checkpoints(str(out))] == [4]
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_sigint_saves_a_checkpoint_exits_130_with_one_line_and_the_resumed_run_is_the_uninterrupted_one(
        tiny, reference, tmp_path, capfd):
    """A real `deltatune train` process (console script, fresh interpreter)."""
    out = tmp_path / "run"
    exe = os.path.join(os.path.dirname(sys.executable), "deltatune")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "deltatune"]
    p = subprocess.Popen(cmd + train_argv(tiny, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not complete_checkpoints(str(out)) and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=240)[1]
    lines = err.strip().splitlines()
    assert p.returncode == 130 and len(lines) == 1, err
    step = [s for s, _ in complete_checkpoints(str(out))][-1]
    assert lines[0] == (f"deltatune: interrupted by SIGINT after step {step} of 40; checkpoint saved in "
                        f"{out}/checkpoint-{step}: resume with: deltatune train --resume {out}")
    assert 1 <= step < 40 and assert_whole(out) == [step]
    assert read_marker(out)["status"] == "running"
    # the interrupted run is not deleted by --overwrite, and a plain rerun says how to resume
    before = _snapshot(out)
    for extra in (["--overwrite"], []):
        code, _, err = run_cli(capfd, *train_argv(tiny, out, *extra))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"holds an interrupted run (checkpoint-{step}): continue it with deltatune train --resume {out}" in err
    code, _, err = run_cli(capfd, "merge", "--adapter", str(reference), "--out", str(out), "--overwrite")
    assert code == 2 and "interrupted run" in err
    assert _snapshot(out) == before
    code, _, err = run_cli(capfd, "train", "--resume", str(out))
    assert code == 0, err
    assert_same_run(out, reference)
    assert not [n for n in os.listdir(out) if CHECKPOINT_RE.fullmatch(n) or is_temporary(n)]
    code, _, err = run_cli(capfd, "train", "--resume", str(out))  # nothing left to do: said, not an error
    assert code == 0 and err.strip() == f"deltatune: {out} holds a finished run (report.json): nothing to resume"


@pytest.mark.parametrize("extra, needle", [
    (["--lr", "0.5"], "--lr is 0.001 in the checkpoint but 0.5 here"),
    (["--rank", "4"], "--rank is 16 in the checkpoint but 4 here"),
    (["--seed", "1"], "--seed is 0 in the checkpoint but 1 here"),
    (["--batch-size", "2"], "--batch-size is 4 in the checkpoint but 2 here"),
    (["--max-steps", "50"], "--max-steps is 40 in the checkpoint but 50 here"),
    (["--method-opt", "use_rslora=true"], "--method-opt is {} in the checkpoint but {'use_rslora': True} here"),
    (["--precision", "bf16"], "--precision is 'fp32' in the checkpoint but 'bf16' here"),
    (["--packing", "off"], "--packing is on in the checkpoint but off here"),
    (["--max-seq-len", "8"], "--max-seq-len is 256 in the checkpoint but 8 here: leave it out"),
    (["--val-fraction", "0.01"], "the training data differs from the checkpoint's (36 examples"),
    (["--data", "OTHER"], "the training data differs from the checkpoint's (36 examples"),
    (["--eval-size", "2"], "--eval-size is 4 in the checkpoint but 2 here"),
    (["--out", "ELSEWHERE"], "is not the folder being resumed"),
    (["--overwrite"], "--overwrite would start it over"),
    (["--keep-checkpoints", "0"], "keep_checkpoints"),
    (["--lr", "1", "--lr", "2"], "--lr given twice"),
])
def test_resume_refuses_another_configuration_or_data_in_one_line_naming_it(
        tiny, interrupted, tmp_path, capfd, extra, needle):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"messages": m}) + "\n" for m in make_dv(40, seed=7)))
    extra = [a.replace("OTHER", str(other)).replace("ELSEWHERE", str(tmp_path / "x")) for a in extra]
    run = _copy(interrupted, tmp_path / "run")
    before = _snapshot(run)
    code, _, err = run_cli(capfd, "train", "--resume", str(run), *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deltatune: error:"), err
    assert needle in lines[0], lines[0]
    assert _snapshot(run) == before  # nothing changed


@pytest.mark.parametrize("what, needle", [
    ("missing", "no such folder"),
    ("foreign", "not the output folder of a deltatune training run"),
    ("merge", "is a merge output"),
    ("damaged", "is damaged"),
])
def test_resume_of_what_is_not_a_run_is_one_line(tiny, interrupted, reference, tmp_path, capfd, what, needle):
    target = tmp_path / "t"
    if what == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif what == "merge":
        assert main(["merge", "--adapter", str(reference), "--out", str(target)]) == 0
    elif what == "damaged":
        _copy(interrupted, target)
        p = target / "checkpoint-4" / STATE_JSON
        p.write_text(p.read_text()[:100])
    before = _snapshot(tmp_path)
    code, _, err = run_cli(capfd, "train", "--resume", str(target))
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert _snapshot(tmp_path) == before


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tiny, reference, tmp_path, capfd):
    out = tmp_path / "run"
    assert _wait(_spawn(train_argv(tiny, out), str(tmp_path / "log"), ("step", 1))) == -signal.SIGKILL
    assert not complete_checkpoints(str(out)) and read_marker(out)["config"]["max_steps"] == 40
    code, stdout, err = run_cli(capfd, "train", "--resume", str(out))
    assert code == 0 and "the run starts again from step 0" in stdout, err
    assert_same_run(out, reference)


def test_keep_checkpoints_keeps_the_last_k_until_the_run_finishes(tiny, reference, tmp_path):
    out = tmp_path / "run"
    assert _wait(_spawn(train_argv(tiny, out, "--keep-checkpoints", "3"), str(tmp_path / "log"),
                        ("step", 7))) == -signal.SIGKILL
    assert [s for s, _ in complete_checkpoints(str(out))] == [4, 5, 6]
    listed = [n for n in read_marker(out)["files"] if CHECKPOINT_RE.fullmatch(n)]
    assert sorted(listed) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    state, run = read_checkpoint(str(out / "checkpoint-5"))
    assert state["step"] == 5 and run["config"]["keep_checkpoints"] == 3
    # each checkpoint's adapter is the run's adapter at that step: resuming from checkpoint-5 (the
    # last one deleted) gives the same end as resuming from checkpoint-6
    import shutil

    shutil.rmtree(out / "checkpoint-6")
    assert main(["train", "--resume", str(out), "--keep-checkpoints", "1"]) == 0
    assert_same_run(out, reference)
    assert "checkpoint-" not in " ".join(os.listdir(out)) and not read_marker(out)["files"][5:]


def test_a_non_finite_step_is_not_taken_the_message_names_it_and_the_last_good_checkpoint_stays(
        tiny, tmp_path, capfd, monkeypatch):
    import deltatune.train.loop as loop

    calls = [0]
    real = loop.token_loss_sum

    def nan_at_step_3(model, batch, **kw):
        calls[0] += 1
        s, n = real(model, batch, **kw)
        return (s * float("nan"), n) if calls[0] == 3 else (s, n)

    monkeypatch.setattr(loop, "token_loss_sum", nan_at_step_3)
    out = tmp_path / "run"
    code, _, err = run_cli(capfd, *train_argv(tiny, out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("deltatune: error: training diverged at step 3: loss nan")
    assert f"the last good checkpoint, {out}/checkpoint-2, is kept" in lines[0]
    assert assert_whole(out) == [2] and not (out / "adapter_model.safetensors").exists()
    assert read_marker(out)["status"] == "diverged"
    code, _, err = run_cli(capfd, *train_argv(tiny, out, "--overwrite"))
    assert code == 2 and "holds a run that diverged (checkpoint-2)" in err


def test_a_non_finite_gradient_with_a_finite_loss_takes_no_step():
    model = _model("plain")
    tr = Trainer(model, _items(), pad_id=0, batch_size=4, max_steps=3, max_grad_norm=None)
    p0 = next(p for p in model.parameters() if p.requires_grad)
    p0.register_hook(lambda g: g * float("inf"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(NonFiniteLoss, match=r"diverged at step 1: loss [0-9.]+, gradient not finite"):
        tr.fit()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert not tr.optimizer.state and tr.step == 0


def test_resume_after_the_fast_path_bf16_packed_rows_shared_prefix(tiny, tmp_path):
    """The CLI run on the fast path (bf16 autocast, packed rows, a shared prefix), killed at its 4th step
    and resumed, ends with the uninterrupted run's adapter (within 1e-6; bit for bit here)."""
    fast = ["--precision", "bf16", "--packing", "on", "--shared-prefix", "on", "--lora-dropout", "0.1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _wait(_spawn(train_argv(tiny, ref, *fast, steps=8), str(tmp_path / "ref.log"))) == 0
    assert _wait(_spawn(train_argv(tiny, out, *fast, steps=8), str(tmp_path / "a.log"), ("step", 4))) == -signal.SIGKILL
    assert [s for s, _ in complete_checkpoints(str(out))] == [3]
    assert _wait(_spawn(["train", "--resume", str(out)], str(tmp_path / "b.log"))) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["precision"] == "bf16" and rep["packing"] and rep["shared_prefix"]
    ta, tb = adapter_of(out), adapter_of(ref)
    assert ta.keys() == tb.keys() and all(float((ta[k] - tb[k]).abs().max()) <= 1e-6 for k in ta)
    assert_same_run(out, ref)
