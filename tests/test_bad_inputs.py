"""The bad-input corpus: every input below gives ONE line ``deltatune: error: ...`` naming the problem
(and the fix), exit code 2, no traceback and no line of a library's own, and leaves everything the
user had as it was (bytes and modification times of the sandbox, the model and the adapters; a
missing ``--out`` is not created).

Static inputs live in ``tests/bad_inputs/`` (configs/, data/); the others (damaged adapters, huge,
binary or unreadable files, full or read-only folders) are made by the ``prep`` of their case from a
tiny model and an adapter trained on it. :data:`CASES` is the listed corpus (one entry per input).
The defects of the new-user pass (``--overwrite`` and the user's ``config.json``, ``eval`` from another
folder, ``| head``, file modes, repeated flags) are tested below the corpus, each over its class.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import make_dv, make_tl, make_tt, model_folder
from deltatune.cli import build_parser, main

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_inputs")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, its data, and a LoRA adapter trained on it (never changed by a case)."""
    root = tmp_path_factory.mktemp("world")
    model = model_folder(root / "tl", make_tl(), make_tt())
    data = root / "dv.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in make_dv(16)))
    adapter = root / "adapter"
    assert main(["train", "--model", model, "--data", str(data), "--out", str(adapter), "--max-steps", "1",
                 "--batch-size", "4", "--eval-size", "2", "--ppl-size", "0", "--threads", "1", "--no-progress",
                 "--no-plot", "--rank", "4", "--target-modules", "q_proj,v_proj"]) == 0
    return {"root": str(root), "model": model, "data": str(data), "adapter": str(adapter)}


def _snapshot(*folders):
    snap = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for n in files + dirs:
                p = os.path.join(root, n)
                st = os.lstat(p)
                body = hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
                snap[p] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, body, stat.S_IMODE(st.st_mode))
    return snap


# ----------------------------------------------------------------------------- the preparations of inputs


def _adapter_copy(w, box, name="ad"):
    return shutil.copytree(w["adapter"], os.path.join(box, name))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


def _edit_config(path, **changes):
    p = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def prep_adapter(kind):
    def prep(w, box):
        ad = _adapter_copy(w, box)
        wp = os.path.join(ad, "adapter_model.safetensors")
        if kind == "truncated":
            data = open(wp, "rb").read()
            open(wp, "wb").write(data[: len(data) // 2])
        elif kind == "empty":
            open(wp, "wb").close()
        elif kind == "garbage":
            open(wp, "wb").write(b"\x00" * 8 + b"not a safetensors header")
        elif kind == "no_weights":
            os.unlink(wp)
        elif kind == "no_config":
            os.unlink(os.path.join(ad, "adapter_config.json"))
        elif kind == "config_not_json":
            open(os.path.join(ad, "adapter_config.json"), "w").write('{"peft_type": "LORA", ')
        elif kind == "config_list":
            open(os.path.join(ad, "adapter_config.json"), "w").write("[1]")
        elif kind == "config_binary":
            open(os.path.join(ad, "adapter_config.json"), "wb").write(b"\xff\xfe\x00{")
        elif kind == "other_method":
            _edit_config(ad, peft_type="IA3", feedforward_modules=[])
        elif kind == "unknown_method":
            _edit_config(ad, peft_type="FANCY")
        elif kind == "rank_a_string":
            _edit_config(ad, r="four")
        elif kind == "alpha_a_list":
            _edit_config(ad, lora_alpha=[8])
        elif kind == "other_base_missing":
            _edit_config(ad, base_model_name_or_path="/nonexistent/other-model")
        elif kind == "int_tensors":
            _save(ad, {k: (v * 1000).to(torch.int64) for k, v in _tensors(ad).items()})
        elif kind == "wrong_shape":
            t = _tensors(ad)
            k = next(k for k in sorted(t) if "lora_A" in k)
            t[k] = torch.zeros(3, t[k].shape[1])
            _save(ad, t)
        elif kind == "missing_key":
            t = _tensors(ad)
            del t[sorted(t)[0]]
            _save(ad, t)
        elif kind == "extra_key":
            t = _tensors(ad)
            t["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(4, 32)
            _save(ad, t)
        elif kind == "nan":
            t = _tensors(ad)
            k = sorted(t)[0]
            t[k] = t[k].clone()
            t[k][0, 0] = float("nan")
            _save(ad, t)
        elif kind == "malicious_bin":
            os.unlink(wp)
            with open(os.path.join(ad, "adapter_model.bin"), "wb") as fh:
                pickle.dump(_Evil(os.path.join(box, "PWNED-by-pickle")), fh)
        return ad
    return prep


class _Evil:
    """A pickle that would create a file when loaded by an unsafe loader."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def prep_other_model(w, box):
    """A model of another shape (hidden 48) for the adapter trained on the 32-wide one."""
    return model_folder(os.path.join(box, "wide"), make_tl(hidden_size=48), make_tt())


def prep_model(kind):
    def prep(w, box):
        m = shutil.copytree(w["model"], os.path.join(box, "model"))
        if kind == "no_weights":
            os.unlink(os.path.join(m, "model.safetensors"))
        elif kind == "truncated_weights":
            p = os.path.join(m, "model.safetensors")
            data = open(p, "rb").read()
            open(p, "wb").write(data[: len(data) // 3])
        elif kind == "no_config":
            os.unlink(os.path.join(m, "config.json"))
        elif kind == "config_broken":
            open(os.path.join(m, "config.json"), "w").write("{")
        return m
    return prep


def prep_data(kind):
    def prep(w, box):
        p = os.path.join(box, f"{kind}.jsonl")
        if kind == "huge_line_no_target":  # a 4 MB prompt: --truncation end cuts its answer away
            json.dump({"prompt": "w7 " * 1_400_000, "completion": "w8"}, open(p, "w"))
        elif kind == "huge_line_broken":
            open(p, "w").write("x" * 4_000_000)
        elif kind == "dir":
            os.mkdir(p)
        return p
    return prep


def prep_out(kind):
    def prep(w, box):
        out = os.path.join(box, "out")
        if kind == "file":
            open(out, "w").write("mine")
        elif kind == "under_file":
            open(out, "w").write("mine")
            return os.path.join(out, "sub")
        elif kind == "foreign":
            os.mkdir(out)
            open(os.path.join(out, "config.json"), "w").write("{}")
        return out
    return prep


# ----------------------------------------------------------------------------- the corpus

TRAIN = ["train", "--model", "{model}", "--data", "{data}", "--out", "{box}/out", "--max-steps", "1",
         "--batch-size", "4", "--eval-size", "2", "--ppl-size", "0", "--threads", "1", "--no-progress", "--no-plot"]


def train_with(*extra, data="{data}", model="{model}", out="{box}/out"):
    argv = list(TRAIN)
    for flag, value in (("--data", data), ("--model", model), ("--out", out)):
        argv[argv.index(flag) + 1] = value
    return argv + list(extra)


def config(name):
    return train_with("--config", os.path.join(HERE, "configs", name))


def data(name):
    return train_with(data=os.path.join(HERE, "data", name))


GEN = ["generate", "--model", "{model}", "--prompt", "w7 w8", "--max-new-tokens", "2", "--threads", "1"]

# (id, argv, what the one line must say, prep: (world, sandbox) -> path put in for {prep})
CASES = [
    # configs: YAML and JSON, wrong types, unknown keys, out-of-range values, unsafe or unreadable files
    ("config-unknown-key", config("unknown_key.yaml"), "unknown option 'max_stepz' in config file (did you mean max_steps", None),
    ("config-int-wrong-type", config("wrong_type_int.yaml"), "option 'max_steps' must be an integer, got 'three'", None),
    ("config-float-wrong-type", config("wrong_type_float.yaml"), "option 'lr' must be a number, got 'fast'", None),
    ("config-bool-wrong-type", config("not_a_bool.yaml"), "option 'overwrite' must be true or false, got 'maybe'", None),
    ("config-bool-as-number", config("bool_as_number.yaml"), "option 'max_steps' must be a number, got True", None),
    ("config-negative", config("negative_grad_accum.yaml"), "option 'grad_accum' must be > 0, got -4", None),
    ("config-out-of-range", config("dropout_out_of_range.yaml"), "option 'lora_dropout' must be in [0, 1), got 1.5", None),
    ("config-zero", config("max_seq_len_zero.json"), "option 'max_seq_len' must be > 0, got 0", None),
    ("config-nan", config("lr_nan.json"), "option 'lr' must be a finite number > 0, got nan", None),
    ("config-list-not-mapping", config("top_level_list.yaml"), "must hold a mapping of option: value, got list", None),
    ("config-yaml-syntax", config("broken_syntax.yaml"), "is not valid YAML", None),
    ("config-python-tag", config("python_tag.yaml"), "is not valid YAML: could not determine a constructor", None),
    ("config-binary", config("binary.yaml"), "is not UTF-8 text (byte 0: invalid start byte): save it as UTF-8", None),
    ("config-json-unknown-key", config("unknown_key.json"), "unknown option 'learning_rate' in config file", None),
    ("config-json-wrong-type", config("method_is_list.json"), "option 'method' must be a string, got ['lora']", None),
    ("config-json-syntax", config("broken.json"), "is not valid JSON", None),
    ("config-method-options-scalar", config("method_options_scalar.yaml"), "method_options must be a mapping, got 5", None),
    ("config-target-modules-number", config("target_modules_number.yaml"), "option 'target_modules' must be a name", None),
    ("config-schedule", config("schedule_unknown.yaml"), "option 'schedule' must be 'cosine' or 'constant', got 'linear'", None),
    ("config-precision", config("precision_unknown.yaml"), "option 'precision' must be one of auto, bf16, fp16, fp32", None),
    ("config-method", config("method_unknown.yaml"), "unknown --method 'lorax'; available:", None),
    ("config-field-of-another-method", config("field_of_another_method.yaml"),
     "config file key 'rank' is not an option of --method ia3 (its options:", None),
    ("config-missing", train_with("--config", "{box}/nope.yaml"), "config file not found:", None),
    ("config-folder", train_with("--config", "{box}"), "is a folder: give a YAML or JSON file", None),
    # data files
    ("data-empty", data("empty.jsonl"), "empty.jsonl is empty", None),
    ("data-blank-lines", data("blank_lines.jsonl"), "blank_lines.jsonl has no rows", None),
    ("data-broken-line", data("broken_line.jsonl"), "broken_line.jsonl: line 2 is not valid JSON (column", None),
    ("data-row-not-object", data("row_is_list.jsonl"), "row_is_list.jsonl: line 1 is a JSON list, not an object", None),
    ("data-missing-field", data("missing_completion.jsonl"), "row 2: field 'completion' is missing", None),
    ("data-empty-field", data("empty_completion.jsonl"), "row 1: field 'completion' is empty", None),
    ("data-no-known-fields", data("no_known_fields.jsonl"), "row 1: no known fields (messages | prompt+completion", None),
    ("data-bad-role", data("bad_role.jsonl"), "row 1: field 'messages'[0].role is 'robot'", None),
    ("data-no-assistant", data("no_assistant.jsonl"), "row 1: field 'messages' has no assistant message", None),
    ("data-content-not-string", data("content_not_string.jsonl"), "field 'messages'[0].content must be a string", None),
    ("data-messages-not-list", data("messages_not_list.jsonl"), "field 'messages' must be a non-empty list", None),
    ("data-utf16", data("utf16.jsonl"), "utf16.jsonl is not UTF-8 text (byte 0", None),
    ("data-latin1", data("latin1.jsonl"), "latin1.jsonl is not UTF-8 text (byte 15", None),
    ("data-binary", data("binary.jsonl"), "binary.jsonl is not text (it holds NUL bytes at byte 5)", None),
    ("data-json-scalar", data("scalar.json"), "scalar.json: line 1 is a JSON int, not an object", None),
    ("data-json-broken", data("object_broken.json"), "object_broken.json is not valid JSON (line 2", None),
    ("data-csv-broken", data("broken.csv"), "broken.csv could not be read as CSV:", None),
    ("data-parquet-garbage", data("garbage.parquet"), "garbage.parquet could not be read as PARQUET:", None),
    ("data-unknown-extension", data("notes.txt"), "notes.txt: unknown extension '.txt'", None),
    ("data-missing", train_with(data="{box}/nope.jsonl"), "data file not found:", None),
    ("data-folder", train_with(data="{prep}"), "is a folder: give a file", prep_data("dir")),
    ("data-huge-line", train_with("--truncation", "end", data="{prep}"), "no training example has a target token left: check the data "
                                                  "and --max-seq-len", prep_data("huge_line_no_target")),
    ("data-huge-line-broken", train_with(data="{prep}"), "line 1 is not valid JSON", prep_data("huge_line_broken")),
    ("data-eval-broken", train_with("--eval-data", os.path.join(HERE, "data", "broken_line.jsonl")),
     "broken_line.jsonl: line 2 is not valid JSON", None),
    ("data-all-cut-away", train_with("--max-seq-len", "2"), "no training example has a target token left", None),
    # adapter folders
    ("adapter-truncated", GEN + ["--adapter", "{prep}"], "adapter_model.safetensors is damaged (", prep_adapter("truncated")),
    ("adapter-empty-weights", ["eval", "--adapter", "{prep}", "--model", "{model}", "--data", "{data}"],
     "adapter_model.safetensors is empty: save or copy the adapter again", prep_adapter("empty")),
    ("adapter-garbage-weights", ["inspect", "{prep}"], "adapter_model.safetensors is damaged", prep_adapter("garbage")),
    ("adapter-no-weights", GEN + ["--adapter", "{prep}"], "no adapter_model.safetensors in", prep_adapter("no_weights")),
    ("adapter-no-config", GEN + ["--adapter", "{prep}"], "is not an adapter folder (no adapter_config.json)",
     prep_adapter("no_config")),
    ("adapter-config-not-json", GEN + ["--adapter", "{prep}"], "adapter_config.json is not valid JSON",
     prep_adapter("config_not_json")),
    ("adapter-config-list", ["inspect", "{prep}"], "adapter_config.json holds a JSON list, not the object",
     prep_adapter("config_list")),
    ("adapter-config-binary", ["merge", "--adapter", "{prep}", "--model", "{model}", "--out", "{box}/m"],
     "adapter_config.json is not valid JSON", prep_adapter("config_binary")),
    ("adapter-config-other-method", GEN + ["--adapter", "{prep}"], "key(s) in the file match nothing in the model",
     prep_adapter("other_method")),
    ("adapter-config-unknown-method", GEN + ["--adapter", "{prep}"], "adapter config has peft_type 'FANCY'",
     prep_adapter("unknown_method")),
    ("adapter-config-field-type", GEN + ["--adapter", "{prep}"], "field 'r' must be int, got 'four'",
     prep_adapter("rank_a_string")),
    ("adapter-config-field-type-float", ["eval", "--adapter", "{prep}", "--model", "{model}", "--data", "{data}"],
     "field 'lora_alpha' must be float, got [8]", prep_adapter("alpha_a_list")),
    ("adapter-config-names-missing-base", ["generate", "--adapter", "{prep}", "--prompt", "w7"],
     "the adapter's base model /nonexistent/other-model is not on this machine: pass --model PATH",
     prep_adapter("other_base_missing")),
    ("adapter-on-another-model", ["generate", "--adapter", "{adapter}", "--model", "{prep}", "--prompt", "w7"],
     "shape mismatch", prep_other_model),
    ("adapter-integer-tensors", GEN + ["--adapter", "{prep}"], "adapter tensors are floating point, but", prep_adapter("int_tensors")),
    ("adapter-wrong-shape", GEN + ["--adapter", "{prep}"], "shape mismatch:", prep_adapter("wrong_shape")),
    ("adapter-missing-key", GEN + ["--adapter", "{prep}"], "adapter tensor(s) of the model are not in the file",
     prep_adapter("missing_key")),
    ("adapter-extra-key", GEN + ["--adapter", "{prep}"], "1 key(s) in the file match nothing in the model",
     prep_adapter("extra_key")),
    ("adapter-nan", GEN + ["--adapter", "{prep}"], "1 tensor(s) hold NaN or infinite values", prep_adapter("nan")),
    ("adapter-malicious-pickle", ["inspect", "{prep}"], "adapter_model.bin was refused: it is not a plain file of "
                                                        "tensors", prep_adapter("malicious_bin")),
    ("adapter-malicious-pickle-generate", GEN + ["--adapter", "{prep}"], "nothing in it was run",
     prep_adapter("malicious_bin")),
    ("adapter-a-file", GEN + ["--adapter", "{data}"], "is not an adapter folder", None),
    ("adapter-missing", ["eval", "--adapter", "{box}/nope"], "is not an adapter folder", None),
    # command-line flags
    ("flag-unknown", ["train", "--max-stepz", "3"], "unrecognized arguments: --max-stepz 3", None),
    ("flag-not-an-int", ["train", "--max-steps", "zero"], "argument --max-steps: invalid int value: 'zero' (see "
                                                          "deltatune train --help)", None),
    ("flag-missing-value", ["train", "--lr"], "argument --lr: expected one argument", None),
    ("flag-repeated", GEN + ["--system", "a", "--system", "b"], "--system given twice: give it once", None),
    ("adapter-unnamed-twice", GEN + ["--adapter", "{adapter}", "--adapter", "{adapter}"],
     "several --adapter folders without names: give NAME=DIR each", None),
    ("flag-repeated-train", train_with("--lr", "1e-3", "--lr", "1e-2"), "--lr given twice", None),
    ("flag-threads-zero", ["generate", "--prompt", "w7", "--threads", "0"], "--threads must be >= 1, got 0", None),
    ("flag-max-new-tokens-zero", ["generate", "--prompt", "w7", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1", None),
    ("flag-device", train_with("--device", "tpu"), "--device 'tpu' is not a device: use auto, cpu, cuda or cuda:N", None),
    ("flag-fp16-on-cpu", train_with("--device", "cpu", "--precision", "fp16"), "--precision fp16 is for CUDA GPUs", None),
    ("flag-keep-checkpoints-zero", train_with("--keep-checkpoints", "0"), "option 'keep_checkpoints' must be > 0", None),
    ("flag-method-opt-unknown", train_with("--method-opt", "bogus=1"), "--method lora has no option 'bogus'", None),
    ("flag-resume-missing", ["train", "--resume", "{box}/nope"], "no such folder: give the --out folder", None),
    ("flag-resume-not-a-run", ["train", "--resume", "{box}"], "is not the output folder of a deltatune training run", None),
    ("flag-no-prompt", ["generate", "--model", "{model}"], "give --prompt TEXT or --prompts-file FILE", None),
    ("flag-no-command", [], "choose a command", None),
    # the environment
    ("env-model-missing", train_with(model="{box}/nope"), "model not found at", None),
    ("env-model-no-weights", train_with(model="{prep}"), "cannot load the model of", prep_model("no_weights")),
    ("env-model-truncated-weights", train_with(model="{prep}"), "cannot load the model of", prep_model("truncated_weights")),
    ("env-model-no-config", train_with(model="{prep}"), "has no config.json", prep_model("no_config")),
    ("env-model-config-broken", train_with(model="{prep}"), "cannot load the tokenizer of", prep_model("config_broken")),
    ("env-out-is-a-file", train_with(out="{prep}"), "is a file: give a folder", prep_out("file")),
    ("env-out-under-a-file", train_with(out="{prep}"), "lies under the file", prep_out("under_file")),
    ("env-out-foreign", train_with("--overwrite", out="{prep}"), "was not written by deltatune", prep_out("foreign")),
    ("env-merge-out-foreign", ["merge", "--adapter", "{adapter}", "--model", "{model}", "--out", "{prep}", "--overwrite"],
     "was not written by deltatune", prep_out("foreign")),
]


def test_the_corpus_is_at_least_50_distinct_inputs():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 50
    static = {f"{d}/{n}" for d in ("configs", "data") for n in os.listdir(os.path.join(HERE, d))}
    used = {a.split("bad_inputs/")[1] for c in CASES for a in c[1] if "bad_inputs/" in a}
    assert static == used  # every file of tests/bad_inputs is a case


def _fill(argv, w, box, prepared):
    subs = {"{model}": w["model"], "{data}": w["data"], "{adapter}": w["adapter"], "{box}": box,
            "{prep}": prepared or ""}
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _run_case(capfd, w, box, argv, needle):
    before = _snapshot(box, w["root"])
    out_missing = {a: not os.path.lexists(a) for a in argv if a.startswith(box)}
    with warnings.catch_warnings():  # every warning shown: on the terminal each would be a line more
        warnings.simplefilter("always")
        code = main(argv)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("deltatune: error: "), err
    assert "Traceback" not in out + err
    assert needle in lines[0], lines[0]
    after = _snapshot(box, w["root"])
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:4]  # nothing changed or made
    assert all(not os.path.lexists(a) for a, missing in out_missing.items() if missing)
    assert not any("PWNED" in n for n in os.listdir(box)) and not os.path.exists("PWNED-by-yaml")


@pytest.mark.parametrize("case_id, argv, needle, prep", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, capfd, case_id, argv, needle, prep):
    box = str(tmp_path / "box")
    os.mkdir(box)
    prepared = prep(world, box) if prep else None
    capfd.readouterr()
    _run_case(capfd, world, box, _fill(argv, world, box, prepared), needle)


# ----------------------------------------------------------------------------- read-only and full folders


def _as_nobody(fn):
    """Run ``fn()`` in a forked process without root's power over file modes (as ``nobody`` when this
    runs as root); return its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_read_only_output_folder_is_one_line_and_nothing_changes(world, tmp_path_factory):
    import tempfile

    root = tempfile.mkdtemp(prefix="dt-ro-")  # readable by everyone (pytest's tmp folders are root's only)
    try:
        os.chmod(root, 0o755)
        model = shutil.copytree(world["model"], os.path.join(root, "model"))
        data = shutil.copy(world["data"], os.path.join(root, "d.jsonl"))
        ro = os.path.join(root, "ro")
        os.mkdir(ro)
        for p in (model, ro):
            for r, ds, fs in os.walk(p):
                for n in ds + fs:
                    os.chmod(os.path.join(r, n), 0o755 if n in ds else 0o644)
        os.chmod(data, 0o644)
        os.chmod(ro, 0o555)
        log = os.path.join(root, "log")

        argv = _fill(TRAIN, {**world, "model": model, "data": data}, root, None)
        argv[argv.index("--out") + 1] = os.path.join(ro, "run")

        def run():
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            return main(argv)

        os.chmod(root, 0o777)
        before = _snapshot(ro)
        assert _as_nobody(run) == 2
        lines = open(log).read().strip().splitlines()
        assert len(lines) == 1 and "cannot be written (no write permission on" in lines[0], lines
        assert _snapshot(ro) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(world, tmp_path, capfd, monkeypatch):
    """ENOSPC at the 40th fsync (inside a checkpoint write, after a few were complete): one line, exit 2,
    the checkpoints written stay whole, nothing half-written under a real name."""
    import deltatune._io as io_mod

    calls = [0]
    real = os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] >= 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(io_mod.os, "fsync", fsync)
    argv = _fill(TRAIN, world, str(tmp_path), None) + ["--save-every", "1"]
    argv[argv.index("--max-steps") + 1] = "20"
    code = main(argv)
    _, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"deltatune: error: cannot write {tmp_path}/out/") and lines[0].endswith(
        ": No space left on device: free some space or choose another --out"), lines[0]
    monkeypatch.undo()
    from deltatune.train.checkpoint import complete_checkpoints, read_checkpoint

    done = complete_checkpoints(str(tmp_path / "out"))
    assert done and read_checkpoint(done[-1][1])[0]["step"] == done[-1][0]
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".deltatune-tmp-")]
    assert main(["train", "--resume", str(tmp_path / "out"), "--threads", "1", "--no-progress"]) == 0


# ----------------------------------------------------------------------------- no code runs on load


def test_a_legacy_bin_adapter_loads_through_weights_only_with_a_one_line_warning(world, tmp_path, capfd):
    ad = shutil.copytree(world["adapter"], tmp_path / "legacy")
    tensors = _tensors(str(ad))
    torch.save(tensors, ad / "adapter_model.bin")
    os.unlink(ad / "adapter_model.safetensors")
    from deltatune.formats.peft import read_adapter_tensors

    with pytest.warns(UserWarning, match=r"legacy pickle file, read with torch.load\(weights_only=True\)"):
        got = read_adapter_tensors(str(ad))
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in got)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["inspect", str(ad), "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["parameters"] == sum(t.numel() for t in tensors.values())
    assert err.strip().splitlines() == [f"deltatune: warning: {ad}/adapter_model.bin is a legacy pickle file, read with "
                                        "torch.load(weights_only=True), which runs no code; save the adapter again to "
                                        "get adapter_model.safetensors"]


def test_a_malicious_pickle_runs_nothing_wherever_it_is_read(world, tmp_path):
    from deltatune import load_adapter
    from deltatune.formats.describe import describe_adapter
    from deltatune.formats.peft import AdapterFileError, read_adapter_tensors

    ad = prep_adapter("malicious_bin")(world, str(tmp_path))
    flag = tmp_path / "PWNED-by-pickle"
    with pytest.raises(AdapterFileError, match="nothing in it was run"):
        read_adapter_tensors(ad)
    with pytest.raises(AdapterFileError):
        describe_adapter(ad)
    with pytest.raises(AdapterFileError):
        load_adapter(make_tl(), ad)
    assert not flag.exists()
    pickle.loads(open(os.path.join(ad, "adapter_model.bin"), "rb").read())  # the file really does run code ...
    assert flag.exists()  # ... when a plain unpickler reads it


# ----------------------------------------------------------------------------- defects of the new-user pass


def _train(world, out, *extra):
    argv = _fill(TRAIN, world, "", None)
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv + list(extra)) == 0


def test_overwrite_deletes_only_what_the_marker_lists_for_every_writer(world, tmp_path, capfd):
    """The user's files in an output folder stay byte for byte, whatever their names: names another
    command writes (config.json, model.safetensors in a train folder; report.json in a merge folder),
    names that look like deltatune's (checkpoint-3)."""
    run = tmp_path / "run"
    _train(world, run)
    mine = {"config.json": "{\"mine\": 1}", "model.safetensors": "my weights", "notes.txt": "notes",
            "checkpoint-3/my.txt": "x"}
    for name, text in mine.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(text)
    _train(world, run, "--overwrite")
    assert all((run / n).read_text() == t for n, t in mine.items())
    assert json.loads((run / "deltatune-output.json").read_text())["kept"] == sorted(
        ["config.json", "checkpoint-3", "model.safetensors", "notes.txt"])
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--model", world["model"], "--out", str(merged)]) == 0
    (merged / "report.json").write_text("my report")
    (merged / "adapter_config.json").write_text("my adapter config")
    assert main(["merge", "--adapter", str(run), "--model", world["model"], "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "report.json").read_text() == "my report"
    assert (merged / "adapter_config.json").read_text() == "my adapter config"
    # a command that would write over a file of the user's is refused before anything changes
    capfd.readouterr()
    before = _snapshot(str(run))
    code = main(["merge", "--adapter", world["adapter"], "--model", world["model"], "--out", str(run), "--overwrite"])
    err = capfd.readouterr()[1]
    assert code == 2 and "holds your file config.json, which this command would write over" in err
    assert _snapshot(str(run)) == before


def test_eval_from_another_folder_finds_the_runs_data(world, tmp_path, monkeypatch, capfd):
    """report.json records absolute, resolved paths: a run started with relative ones is evaluated from
    anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(world["data"], work / "d.jsonl")
    monkeypatch.chdir(work)
    argv = _fill(TRAIN, world, "", None)
    argv[argv.index("--data") + 1] = "d.jsonl"
    argv[argv.index("--out") + 1] = "runs/a"
    assert main(argv + ["--val-fraction", "0.2"]) == 0
    rep = json.loads((work / "runs/a/report.json").read_text())
    assert rep["config"]["data"] == str(work / "d.jsonl") and rep["config"]["out"] == str(work / "runs/a")
    assert rep["config"]["model"] == os.path.realpath(world["model"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capfd.readouterr()
    assert main(["eval", "--adapter", str(work / "runs/a"), "--json", "--threads", "1"]) == 0
    res = json.loads(capfd.readouterr()[0].strip().splitlines()[-1])
    assert res["n"] == rep["eval_examples"] and res["metric"] == rep["metric_after"]
    assert abs(res["eval_loss"] - rep["eval_loss_after"]) < 1e-5


def test_a_closed_stdout_ends_the_output_quietly(world, tmp_path):
    """`deltatune inspect DIR --json | head -c 1`: a real process whose reader went away: exit 0, nothing on
    stderr (before: `deltatune: error: BrokenPipeError`)."""
    exe = os.path.join(os.path.dirname(sys.executable), "deltatune")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "deltatune"]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte
    p = subprocess.run(cmd + ["inspect", world["adapter"], "--json"], stdout=w, stderr=subprocess.PIPE, text=True,
                       timeout=240)
    os.close(w)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_a_closed_stdout_does_not_stop_a_training_run(world, tmp_path, monkeypatch):
    class Gone:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def fileno(self):
            raise OSError("no fd")

    monkeypatch.setattr(sys, "stdout", Gone())
    out = tmp_path / "run"
    _train(world, out)
    assert json.loads((out / "report.json").read_text())["steps"] == 1


def test_every_file_deltatune_writes_has_the_usual_mode(world, tmp_path):
    """0o666 minus the umask (0644 here) for every writer: train's files and checkpoints, merge's model
    and tokenizer files (the merged model.safetensors was 0600), save_adapter."""
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        from deltatune.train.checkpoint import STATE_JSON

        argv = _fill(TRAIN, world, "", None)
        argv[argv.index("--out") + 1] = str(run)
        pid = os.fork()
        if pid == 0:  # killed at its second step: checkpoint-1 stays to be looked at
            import deltatune.train.loop as loop

            real, n = loop.token_loss_sum, [0]

            def second_step_dies(*a, **kw):
                n[0] += 1
                if n[0] == 2:
                    os.kill(os.getpid(), 9)
                return real(*a, **kw)

            loop.token_loss_sum = second_step_dies
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os._exit(main(argv[:argv.index("--max-steps") + 1] + ["3"] + argv[argv.index("--max-steps") + 2:]
                          + ["--save-every", "1"]))
        os.waitpid(pid, 0)
        assert (run / "checkpoint-1" / STATE_JSON).is_file()
        ckpt = [run / "checkpoint-1" / n for n in os.listdir(run / "checkpoint-1")]
        done = tmp_path / "done"
        _train(world, done)
        merged = tmp_path / "merged"
        assert main(["merge", "--adapter", str(done), "--model", world["model"], "--out", str(merged)]) == 0
        import deltatune as dt

        saved = tmp_path / "saved"
        m = make_tl()
        dt.load_adapter(m, str(done))
        dt.save_adapter(m, str(saved))
        files = ckpt + [p for d in (run, done, merged, saved) for p in d.iterdir() if p.is_file()]
        assert any(p.name == "model.safetensors" for p in files) and len(files) > 15
        modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert set(modes.values()) == {"0o644"}, modes
    finally:
        os.umask(old)


def _single_valued_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for cmd, p in sub.choices.items():
        for a in p._actions:
            if a.option_strings and a.nargs is None and type(a).__name__ == "_StoreOnce":
                yield cmd, a.option_strings[-1], str(list(a.choices)[0]) if a.choices else "1"


@pytest.mark.parametrize("cmd, flag, value", list(_single_valued_flags()))
def test_every_single_valued_flag_given_twice_is_refused(capfd, cmd, flag, value):
    code = main([cmd, flag, value, flag, value] + (["x"] if cmd == "inspect" else []))
    lines = capfd.readouterr()[1].strip().splitlines()
    assert code == 2 and lines == [f"deltatune: error: {flag} given twice: give it once"] or \
        (len(lines) == 1 and "given twice: give it once" in lines[0] and flag in lines[0]), lines


def test_the_class_of_repeated_flags_is_every_command():
    flags = [(c, f) for c, f, _ in _single_valued_flags()]
    assert {c for c, _ in flags} >= {"train", "eval", "generate", "merge", "export", "chat"}
    assert ("chat", "--adapter") in flags and ("eval", "--model") in flags and ("train", "--lr") in flags
    assert len(flags) > 50
