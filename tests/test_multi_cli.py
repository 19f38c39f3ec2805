"""The command line with several adapters on a tiny local model folder (TL + TT): ``generate`` and
``eval`` with ``--adapter NAME=DIR`` repeated and a per-row ``adapter`` field (rows of different
adapters batched together, each answer equal to that adapter's answer alone), and ``combine``."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.cli import main

from conftest import make_dv, make_tl, make_tt, maxdiff, model_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A TL + TT model folder and three random LoRA adapters saved against it (a, b: plain; d: DoRA)."""
    root = tmp_path_factory.mktemp("multi")
    model_dir = model_folder(root / "tl", make_tl(), make_tt())
    out = {"model": model_dir}
    g = torch.Generator().manual_seed(0)
    for name, kw in (("a", {}), ("b", {"r": 2}), ("d", {"use_dora": True})):
        m = make_tl()
        dt.inject(m, dt.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                      "init_lora_weights": False, "base_model_name_or_path": model_dir, **kw}))
        with torch.no_grad():
            for p in dt.get_record(m, "default").parameters(m):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out[name] = str(root / name)
        dt.save_adapter(m, out[name])
    return out


def run(capsys, *argv):
    code = main(list(argv))
    o, e = capsys.readouterr()
    return code, o, e


def jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


PROMPTS = ["w7 w8 w9", "w10", "w11 w12", "w13 w14 w15 w16", "w17"]


def user(text):
    return {"messages": [{"role": "user", "content": text}]}


def test_generate_answers_each_prompt_with_its_adapter_in_one_batch(folders, tmp_path, capsys):
    f = jsonl(tmp_path / "p.jsonl", [{**user(PROMPTS[0]), "adapter": "a"}, {**user(PROMPTS[1]), "adapter": "b"},
                                     {**user(PROMPTS[2]), "adapter": "__base__"}, user(PROMPTS[3]),
                                     {**user(PROMPTS[4]), "adapter": "a"}])
    code, out, err = run(capsys, "generate", "--adapter", f"a={folders['a']}", "--adapter", f"b={folders['b']}",
                         "--model", folders["model"], "--prompts-file", f, "--max-new-tokens", "5", "--json",
                         "--threads", "1")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in rows] == [
        (PROMPTS[0], "a"), (PROMPTS[1], "b"), (PROMPTS[2], "__base__"), (PROMPTS[3], "a"), (PROMPTS[3], "b"),
        (PROMPTS[4], "a")]
    alone = {}
    for name in ("a", "b", None):
        args = ["generate", "--model", folders["model"], "--max-new-tokens", "5", "--json", "--threads", "1"]
        args += ["--adapter", folders[name]] if name else []
        for p in PROMPTS:
            args += ["--prompt", p]
        code, o, _ = run(capsys, *args)
        assert code == 0
        alone[name or "__base__"] = {json.loads(line)["prompt"]: json.loads(line)["answer"] for line in o.splitlines()}
    for r in rows:
        assert r["answer"] == alone[r["adapter"]][r["prompt"]], r
    assert len({alone[n][PROMPTS[3]] for n in alone}) > 1  # the adapters answer differently: the check can fail


def test_eval_scores_rows_per_adapter_like_each_alone(folders, tmp_path, capsys):
    convs = make_dv(9, seed=4)
    rows = [{"messages": c, **({"adapter": ["a", "b", "d"][i % 3]} if i < 6 else {})} for i, c in enumerate(convs)]
    f = jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = run(capsys, "eval", "--adapter", f"a={folders['a']}", "--adapter", f"b={folders['b']}",
                         "--adapter", f"d={folders['d']}", "--model", folders["model"], "--data", f, "--json",
                         "--threads", "1", "--max-new-tokens", "3")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n"] == 6 + 3 * 3 and {k: v["n"] for k, v in res["by_adapter"].items()} == {"a": 5, "b": 5, "d": 5}
    for name in ("a", "b", "d"):
        mine = [{"messages": c} for i, c in enumerate(convs) if i >= 6 or i % 3 == "abd".index(name)]
        g = jsonl(tmp_path / f"{name}.jsonl", mine)
        code, o, _ = run(capsys, "eval", "--adapter", folders[name], "--model", folders["model"], "--data", g, "--json",
                         "--threads", "1", "--max-new-tokens", "3")
        one = json.loads(o.strip().splitlines()[-1])
        assert one["n"] == 5 and one["metric"] == res["by_adapter"][name]["metric"], name
        assert abs(one["eval_loss"] - res["by_adapter"][name]["eval_loss"]) <= 1e-5, name
    losses = [v["eval_loss"] for v in res["by_adapter"].values()]
    assert max(losses) - min(losses) > 1e-3 and min(losses) <= res["eval_loss"] <= max(losses)


def test_bad_adapter_choices_are_one_line_errors(folders, tmp_path, capsys):
    f = jsonl(tmp_path / "p.jsonl", [{**user("w7"), "adapter": "zz"}])
    code, _, err = run(capsys, "generate", "--adapter", f"a={folders['a']}", "--model", folders["model"],
                       "--prompts-file", f)
    assert code == 2 and "asks for adapter 'zz', which is not loaded" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "generate", "--adapter", f"a={folders['a']}", "--adapter", f"a={folders['b']}",
                       "--model", folders["model"], "--prompt", "w7")
    assert code == 2 and "names 'a' twice" in err
    code, _, err = run(capsys, "generate", "--adapter", f"__base__={folders['a']}", "--model", folders["model"],
                       "--prompt", "w7")
    assert code == 2 and "reserved" in err


def test_combine_writes_the_combined_adapter(folders, tmp_path, capsys):
    out = tmp_path / "mix"
    code, o, err = run(capsys, "combine", "--adapter", f"a={folders['a']}", "--adapter", f"b={folders['b']}",
                       "--weights", "1.0,-0.5", "--type", "cat", "--model", folders["model"], "--out", str(out))
    assert code == 0, err
    rec = json.loads((out / "combine.json").read_text())
    assert rec["weights"] == [1.0, -0.5] and rec["combination_type"] == "cat"
    ref = make_tl()
    dt.load_adapter(ref, folders["a"], adapter_name="a")
    dt.load_adapter(ref, folders["b"], adapter_name="b")
    dt.add_weighted_adapter(ref, ["a", "b"], [1.0, -0.5], "mix", "cat")
    dt.set_adapter(ref, "mix")
    got = dt.load_adapter(make_tl(), str(out))
    x = torch.tensor([[1, 3, 7, 8, 9]])
    with torch.no_grad():
        assert maxdiff(got(x).logits, ref(x).logits) <= 1e-6
    for argv, needle in (
        (["--weights", "1.0", "--type", "cat"], "1 numbers for 2 adapters"),
        (["--weights", "1,1", "--type", "avg"], "--type 'avg'"),
        (["--weights", "1,x", "--type", "cat"], "comma-separated numbers"),
        (["--weights", "1,1", "--type", "ties"], "needs density"),
    ):
        code, _, err = run(capsys, "combine", "--adapter", f"a={folders['a']}", "--adapter", f"b={folders['b']}",
                           "--model", folders["model"], "--out", str(tmp_path / "bad"), *argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    code, _, err = run(capsys, "combine", "--adapter", f"a={folders['a']}", "--adapter", f"d={folders['d']}",
                       "--weights", "1,1", "--type", "svd", "--model", folders["model"], "--out", str(tmp_path / "bad"))
    assert code == 2 and "not supported for DoRA adapters" in err
    assert not (tmp_path / "bad").exists()
