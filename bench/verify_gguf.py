"""llama.cpp runs deltatune's GGUF exports and answers as deltatune does (``make verify-gguf``).

On held-out words of the default task (the first ``--words`` of the adapter's own run, from its
``report.json``), the greedy answers of deltatune (the base + the adapter folder, float32) are compared
with llama.cpp's (through ``llama-cpp-python``, built from source by ``make verify-gguf``) for:

* ``base-f32 + adapter``: the base written as an f32 GGUF model file (deltatune's float32 weights of the
  base, so llama.cpp computes with the weights deltatune computes with) + ``deltatune export --format
  gguf`` (the LoRA adapter GGUF);
* ``original base + adapter``: the base GGUF the adapter was trained on (the default model's Q4_1 file:
  deltatune trained on its de-quantised weights; llama.cpp's Q4_1 kernels also round the activations)
  + the same adapter file: what ``ollama create -f Modelfile`` runs;
* ``merged f32`` and ``merged q8_0``: ``deltatune merge --format gguf`` in those types.

Every prompt is the same token ids in both (the chat template applied by the transformers tokenizer),
decoding is greedy, answers stop at the end-of-turn token. Prints a table and one summary line per
variant; exits 1 when the f32 variants (``base-f32 + adapter``, ``merged f32``) do not agree on every word.

    python bench/verify_gguf.py --adapter runs/demo --out runs/gguf-check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="runs/demo", help="a LoRA adapter folder trained on the default task")
    p.add_argument("--out", default="runs/gguf-check", help="folder for the GGUF files")
    p.add_argument("--words", type=int, default=20, help="held-out words compared (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("verify_gguf: llama-cpp-python is not installed: run `make verify-gguf` (it builds it from source)",
              file=sys.stderr)
        return 2
    from deltatune.formats import gguf as gg
    from deltatune.integrations.hf_trainer import drop_gguf_quantizer
    from deltatune.integrations.transformers import resolve_model
    from deltatune.train.commands import base_for_adapter, load_with_adapter
    from deltatune.train.data import ChatEncoder, end_of_turn_ids, pad_id_of
    from deltatune.train.evaluate import evaluation_mode, greedy_generate
    from deltatune.train.export import run_export, run_merge_gguf
    from deltatune.train.pipeline import load_base
    from deltatune.train.task import build_task

    t0 = time.time()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    conf = json.load(open(os.path.join(args.adapter, "report.json")))["config"]
    task = build_task(conf["task_train_size"], conf["eval_size"], conf["seed"])
    words = task.eval[: args.words]

    # the GGUF files
    base_path = base_for_adapter(args.adapter, None)
    base_src = resolve_model(base_path)
    if not base_src.gguf_file:
        print("verify_gguf: the adapter's base is not a GGUF file", file=sys.stderr)
        return 2
    adapter_gguf = os.path.join(args.out, "adapter-f32.gguf")
    run_export(args.adapter, adapter_gguf, overwrite=True, log=None)
    merged = {t: os.path.join(args.out, f"merged-{t}.gguf") for t in ("f32", "q8_0")}
    for t, path in merged.items():
        run_merge_gguf(args.adapter, path, gguf_type=t, overwrite=True, log=None)
    base_model, tok, _ = load_base(base_path, "float32")
    drop_gguf_quantizer(base_model)
    base_f32 = os.path.join(args.out, "base-f32.gguf")
    with torch.no_grad():
        gg.write_model_gguf(base_f32, base_model.state_dict(), base_model.config.to_dict(), gguf_type="f32",
                            tokenizer=gg.tokenizer_fields(base_src.display), name="base-f32")
    del base_model

    # deltatune's answers (float32, greedy)
    model, tok, _ = load_with_adapter(args.adapter, None, "float32", log=None)
    enc = ChatEncoder(tok)
    prompts = [enc.prompt_ids(ex.prompt_messages()) for ex in words]
    stops = end_of_turn_ids(tok)
    with evaluation_mode(model):
        ours = greedy_generate(model, prompts, max_new_tokens=args.max_new_tokens, stop_ids=stops,
                               pad_id=pad_id_of(tok))
    del model

    def llama_answers(model_path, lora_path=None):
        llm = llama_cpp.Llama(model_path=model_path, lora_path=lora_path, n_ctx=256, n_threads=threads,
                              n_threads_batch=threads, verbose=False, seed=0)
        out = []
        for ids in prompts:
            got = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                if t in stops or len(got) >= args.max_new_tokens:
                    break
                got.append(int(t))
            out.append(got)
        if hasattr(llm, "close"):
            llm.close()
        return out

    variants = {
        "base-f32 + adapter": llama_answers(base_f32, adapter_gguf),
        "original base + adapter": llama_answers(base_src.display, adapter_gguf),
        "merged f32": llama_answers(merged["f32"]),
        "merged q8_0": llama_answers(merged["q8_0"]),
    }
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    print(f"{'prompt':<44}{'expected':<14}{'deltatune':<14}" + "".join(f"{k:<26}" for k in variants))
    for i, ex in enumerate(words):
        row = f"{ex.prompt_messages()[-1]['content'][:42]:<44}{ex.reference:<14}{dec(ours[i])!r:<14}"
        for v in variants.values():
            cell = repr(dec(v[i])) + ("" if v[i] == ours[i] else " (differs)")
            row += f"{cell:<26}"
        print(row)
    print()
    agree = {}
    for k, v in variants.items():
        agree[k] = sum(a == b for a, b in zip(v, ours))
        print(f"{k}: same greedy answer (token ids) as deltatune on {agree[k]} of {len(words)} held-out words")
    print(f"llama-cpp-python {llama_cpp.__version__}; {time.time() - t0:.0f} s")
    return 0 if agree["base-f32 + adapter"] == len(words) and agree["merged f32"] == len(words) else 1


if __name__ == "__main__":
    sys.exit(main())
