"""Output folders: which folders deltatune may write into, and what it may delete there.

Every folder deltatune writes (``train --out``, ``merge --out``) holds :data:`OUTPUT_MARKER`,
written first. Only a folder with the marker may be replaced with ``--overwrite``, and then only
deltatune's own entries are deleted (the names below and those the marker lists); anything else
the user put there stays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from ..formats.peft import atomic_write_bytes
from .config import UsageError

OUTPUT_MARKER = "deltatune-output.json"
_OWN_NAMES = {"adapter_config.json", "adapter_model.safetensors", "report.json", "metrics.jsonl", "curves.png",
              "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "vocab.json", "merges.txt", "added_tokens.json", OUTPUT_MARKER}


def _own_entry(name: str, listed: set) -> bool:
    return (name in _OWN_NAMES or name in listed or re.fullmatch(r"checkpoint-\d+", name) is not None
            or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None
            or name.startswith("events.out.tfevents."))


def check_out(path: str, overwrite: bool) -> str:
    """Check that ``path`` can take a new output (nothing is changed); return it absolute.

    Raises:
        UsageError: ``path`` is a file or lies under one; it exists, is not empty and ``overwrite``
            is False; or it is not empty and was not written by deltatune (no marker file, and not a
            training run of a version before the marker: ``report.json`` + ``adapter_config.json``):
            such a folder is never emptied, whatever the flags.
    """
    path = os.path.abspath(os.path.expanduser(path))
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isfile(path):
        raise UsageError(f"--out {path} is a file: give a folder")
    if parent and parent != path and not os.path.isdir(parent):
        raise UsageError(f"--out {path} lies under the file {parent}: give a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise UsageError(f"--out {path} exists and is not empty: pass --overwrite or choose another folder")
        legacy_run = all(os.path.isfile(os.path.join(path, n)) for n in ("report.json", "adapter_config.json"))
        if not os.path.isfile(os.path.join(path, OUTPUT_MARKER)) and not legacy_run:
            raise UsageError(f"--out {path} is not empty and was not written by deltatune (no {OUTPUT_MARKER}): "
                             "refusing to delete anything in it; choose another folder")
    return path


def prepare_out(path: str, overwrite: bool, command: str = "train") -> str:
    """:func:`check_out`, then create ``path`` or delete deltatune's earlier output in it, and write the marker.

    Only deltatune's own entries go (the files and ``checkpoint-N`` folders a run or merge writes,
    and whatever the marker lists); any other file stays where it is.
    """
    path = check_out(path, overwrite)
    kept: list = []
    if os.path.isdir(path) and os.listdir(path):
        try:
            with open(os.path.join(path, OUTPUT_MARKER), encoding="utf-8") as fh:
                listed = set(json.load(fh).get("files", []))
        except (OSError, ValueError, AttributeError):
            listed = set()
        for name in sorted(os.listdir(path)):
            if not _own_entry(name, listed):
                kept.append(name)  # the user's: stays, and is never listed as deltatune's
                continue
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    try:
        os.makedirs(path, exist_ok=True)
        write_marker(path, command, files=[], kept=kept)
    except OSError as e:
        raise UsageError(f"--out {path} cannot be written: {e.strerror or e}") from None
    return path


def refuse_foreign_files(path: str, names) -> None:
    """Raise :class:`UsageError` when ``path`` holds one of ``names`` that deltatune did not write there
    (the marker does not list it): a run that writes such a file would replace the user's."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(os.path.join(path, OUTPUT_MARKER), encoding="utf-8") as fh:
            ours = set(json.load(fh).get("files", []))
    except (OSError, ValueError, AttributeError):
        ours = set()
    for n in names:
        if os.path.exists(os.path.join(path, n)) and n not in ours:
            raise UsageError(f"--out {path} holds a {n} deltatune did not write, and this run writes its in-memory "
                             f"rows there: choose another --out")


def write_marker(path: str, command: str, files: Optional[list] = None, kept: Optional[list] = None) -> None:
    """(Re)write the marker of an output folder. ``files``: the entries deltatune wrote there (default:
    all but those the marker records as the user's, ``kept``, which were there before the run)."""
    marker = os.path.join(path, OUTPUT_MARKER)
    if kept is None:
        try:
            with open(marker, encoding="utf-8") as fh:
                kept = list(json.load(fh).get("kept", []))
        except (OSError, ValueError, AttributeError):
            kept = []
    if files is None:
        files = sorted(n for n in os.listdir(path) if n != OUTPUT_MARKER and n not in kept)
    body = {"written_by": "deltatune", "command": command, "files": files, "kept": sorted(kept)}
    atomic_write_bytes(marker, (json.dumps(body, indent=1) + "\n").encode())

