"""Output folders: which folders deltatune may write into, and what it may delete there.

Every folder deltatune writes (``train --out``, ``merge --out``) holds :data:`OUTPUT_MARKER`,
written before anything else. The marker lists, by exact name, every entry the command writes
there (``files``: a train run lists its files up front and each ``checkpoint-N`` before it appears;
a merge lists its files before moving them in), and the names that were there before
(``kept``: the user's). The rules:

* only a folder with the marker (or a training run of a version before the marker:
  ``report.json`` + ``adapter_config.json``) may be replaced with ``--overwrite``, and then only
  the entries its marker lists are deleted, plus deltatune's temporary entries
  (:data:`deltatune._io.TMP_PREFIX`); anything else the user put there stays, untouched;
* a command never writes over a file of the user's: a name it would write that the user has there
  is refused before anything changes;
* the checkpoints of an unfinished training run (interrupted, killed or diverged) are never deleted
  by another command: ``--overwrite`` refuses such a folder and says how to resume it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Iterable, Optional

from .._io import TMP_PREFIX, atomic_write_bytes, fsync_dir, is_temporary, remove_temporaries, usual_mode
from .config import UsageError

OUTPUT_MARKER = "deltatune-output.json"
# what a training run writes into --out (besides checkpoint-N folders, listed as they are made)
TRAIN_FILES = ("metrics.jsonl", "adapter_model.safetensors", "adapter_config.json", "report.json", "curves.png")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def read_marker(path: str) -> Optional[dict]:
    """The marker of output folder ``path`` (None: absent or unreadable)."""
    try:
        with open(os.path.join(path, OUTPUT_MARKER), encoding="utf-8") as fh:
            body = json.load(fh)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _listed(body: Optional[dict], key: str) -> list:
    v = (body or {}).get(key)
    return [n for n in v if isinstance(n, str)] if isinstance(v, list) else []


def checkpoint_names(path: str) -> list[str]:
    """The ``checkpoint-N`` entries deltatune wrote in ``path`` (listed in its marker), by step."""
    body = read_marker(path)
    listed = set(_listed(body, "files")) if body is not None else None
    try:
        names = [n for n in os.listdir(path) if CHECKPOINT_RE.fullmatch(n) and (listed is None or n in listed)]
    except OSError:
        return []
    return sorted(names, key=lambda n: int(CHECKPOINT_RE.fullmatch(n).group(1)))


def interrupted_run(path: str) -> Optional[str]:
    """When ``path`` holds a training run that did not finish and left checkpoints: a phrase saying so
    (``"an interrupted run (checkpoint-12)"``), else None."""
    body = read_marker(path)
    if body is None or body.get("command") != "train" or body.get("status") == "finished":
        return None
    ckpts = checkpoint_names(path)
    if not ckpts:
        return None
    what = "a run that diverged" if body.get("status") == "diverged" else "an interrupted run"
    return f"{what} ({ckpts[-1]})"


def _legacy_run(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, n)) for n in ("report.json", "adapter_config.json"))


def _own_names(path: str, body: Optional[dict]) -> set:
    """The entries of ``path`` deltatune may delete: those its marker lists (a legacy training run:
    the files training wrote then), the marker itself."""
    if body is None:
        listed = set(TRAIN_FILES) | {n for n in os.listdir(path) if CHECKPOINT_RE.fullmatch(n)}
    else:
        listed = set(_listed(body, "files"))
    return listed | {OUTPUT_MARKER}


def check_out(path: str, overwrite: bool, will_write: Iterable[str] = ()) -> str:
    """Check that ``path`` can take a new output (nothing is changed); return it absolute.

    Raises:
        UsageError: ``path`` is a file or lies under one; it exists, is not empty and ``overwrite``
            is False; it is not empty and was not written by deltatune (no marker file, and not a
            training run of a version before the marker): such a folder is never emptied, whatever
            the flags; it holds an unfinished run's checkpoints; a file of the user's there has a
            name in ``will_write``; or it cannot be written.
    """
    path = os.path.abspath(os.path.expanduser(path))
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if os.path.isfile(path):
        raise UsageError(f"--out {path} is a file: give a folder")
    if parent and parent != path and not os.path.isdir(parent):
        raise UsageError(f"--out {path} lies under the file {parent}: give a folder")
    if os.path.isdir(path) and [n for n in os.listdir(path) if not is_temporary(n)]:  # what a crash left
        unfinished = interrupted_run(path)
        if unfinished:
            raise UsageError(f"--out {path} holds {unfinished}: continue it with deltatune train --resume {path}, "
                             "or choose another folder (remove its checkpoint-* folders yourself to start over there)")
        if not overwrite:
            raise UsageError(f"--out {path} exists and is not empty: pass --overwrite or choose another folder")
        body = read_marker(path)
        if body is None and not _legacy_run(path):
            raise UsageError(f"--out {path} is not empty and was not written by deltatune (no {OUTPUT_MARKER}): "
                             "refusing to delete anything in it; choose another folder")
        theirs = _users_files(path, body, will_write)
        if theirs:
            raise UsageError(f"--out {path} holds your file {theirs[0]}, which this command would write over: "
                             "move it away or choose another folder")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path} cannot be written (no write permission on {parent}): choose another folder")
    return path


def prepare_out(path: str, overwrite: bool, command: str = "train", will_write: Iterable[str] = (),
                **fields) -> str:
    """:func:`check_out`, then create ``path`` or delete deltatune's earlier output in it, and write the
    marker listing ``will_write`` (and ``fields``, e.g. a run's configuration).

    Only the entries the earlier marker lists go (and deltatune's temporary entries); any other
    file stays where it is and is recorded as the user's.
    """
    will_write = list(will_write)
    path = check_out(path, overwrite, will_write)
    kept: list = []
    try:
        if os.path.isdir(path) and os.listdir(path):
            own = _own_names(path, read_marker(path))
            remove_temporaries(path)
            for name in sorted(os.listdir(path)):
                if name not in own:
                    kept.append(name)  # the user's: stays, and is never listed as deltatune's
                    continue
                p = os.path.join(path, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
        os.makedirs(path, exist_ok=True)
        write_marker(path, command, files=will_write, kept=kept, status="running", **fields)
    except OSError as e:
        raise UsageError(f"--out {path} cannot be written: {e.strerror or e}: choose another folder") from None
    return path


def write_marker(path: str, command: str, files: Optional[list] = None, kept: Optional[list] = None,
                 **fields) -> dict:
    """(Re)write the marker of an output folder and return its content. ``files``: the entries deltatune
    writes there (default: those the marker lists already); ``kept``: the user's entries that were
    there before (default: as recorded); ``fields``: more entries (``status``, ``config`` ...), the
    recorded ones kept otherwise."""
    body = read_marker(path) or {}
    files = _listed(body, "files") if files is None else list(files)
    kept = _listed(body, "kept") if kept is None else list(kept)
    new = {k: v for k, v in body.items() if k not in ("written_by", "command", "files", "kept", "temporary")}
    new.update(fields)
    out = {"written_by": "deltatune", "command": command, "files": list(dict.fromkeys(files)),
           "kept": sorted(kept), "temporary": TMP_PREFIX + "*", **new}
    atomic_write_bytes(os.path.join(path, OUTPUT_MARKER), (json.dumps(out, indent=1) + "\n").encode())
    return out


def record_files(path: str, add: Iterable[str] = (), remove: Iterable[str] = (), **fields) -> None:
    """Add names to (before they are written) or remove names from (after they are deleted) the marker's
    list of deltatune's entries in ``path``."""
    body = read_marker(path) or {}
    gone = set(remove)
    files = [n for n in _listed(body, "files") if n not in gone]
    files += [n for n in add if n not in files]
    write_marker(path, body.get("command", "train"), files=files, **fields)


def adopt_files(path: str, staging: str) -> list[str]:
    """Move every file of the folder ``staging`` (made by :func:`staging_dir` inside ``path``) into
    ``path``, each with the usual permissions and recorded in the marker first; return their names.

    Raises:
        UsageError: a file of the user's in ``path`` has the name of one of them (nothing is moved).
    """
    names = sorted(os.listdir(staging))
    body = read_marker(path)
    own = _own_names(path, body)
    theirs = [n for n in names if os.path.lexists(os.path.join(path, n)) and n not in own]
    if theirs:
        shutil.rmtree(staging, ignore_errors=True)
        raise UsageError(f"--out {path} holds your file {theirs[0]}, which this command would write over: "
                         "move it away or choose another folder")
    record_files(path, add=names)
    mode = usual_mode()
    for n in names:
        src = os.path.join(staging, n)
        if os.path.isfile(src):
            os.chmod(src, mode)
        os.replace(src, os.path.join(path, n))
    os.rmdir(staging)
    fsync_dir(path)
    return names


def staging_dir(path: str, what: str) -> str:
    """A fresh temporary folder inside ``path`` (a deltatune temporary name) to write ``what`` into."""
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{what}-", dir=path)


def _users_files(path: str, body: Optional[dict], names: Iterable[str]) -> list[str]:
    """The entries of ``path`` named in ``names`` that deltatune did not write there (``body``: its
    marker), sorted: a command writing those names would replace the user's files."""
    own = _own_names(path, body)
    return sorted(n for n in set(names) if os.path.lexists(os.path.join(path, n)) and n not in own)


def refuse_foreign_files(path: str, names: Iterable[str]) -> None:
    """Raise :class:`UsageError` when ``path`` holds one of ``names`` that deltatune did not write there
    (its marker does not list it): a run that writes such a file would replace the user's."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        return
    theirs = _users_files(path, read_marker(path), names)
    if theirs:
        raise UsageError(f"--out {path} holds a {theirs[0]} deltatune did not write, and this run writes its "
                         "in-memory rows there: choose another --out")
