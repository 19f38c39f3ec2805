"""File writing shared by every writer in deltatune: atomic replacement, usual permissions.

Every temporary entry deltatune makes (a file being written, a checkpoint folder being filled, a
folder being deleted) is named with :data:`TMP_PREFIX` in the folder of its target, so that a
crash (``kill -9``, a power cut) leaves either the old entry or the new one under the real name,
never half of one; the temporary names are deltatune's alone and are cleaned up by the next run
that writes into the folder (:func:`remove_temporaries`).
"""

from __future__ import annotations

import os
import shutil
import tempfile

TMP_PREFIX = ".deltatune-tmp-"


def is_temporary(name: str) -> bool:
    """True for the name of an entry deltatune is writing or deleting (see :data:`TMP_PREFIX`)."""
    return os.path.basename(name).startswith(TMP_PREFIX)


def usual_mode() -> int:
    """The permissions ``open()`` gives a new file: ``0o666`` minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in folder ``path`` durable (no-op where folders cannot be fsync'ed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new, never half.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and the file is
    renamed over ``path``. The new file gets the permissions ``open()`` would give it (``0o666``
    minus the umask), not ``mkstemp``'s 0600.
    """
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=d)
    try:
        try:
            os.chmod(tmp, usual_mode())
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # say which file (fsync and write do not)
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
    fsync_dir(d)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the file descriptor ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_new_file(path: str, data: bytes) -> None:
    """Create ``path`` (inside a folder being filled under a temporary name) with ``data``, fsync'ed, with
    the usual permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Delete the folder ``path`` so that a crash never leaves it half deleted under its name: it is
    first renamed to a temporary name (atomic), then deleted."""
    parent, name = os.path.split(os.path.abspath(path))
    gone = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}del-{name}-", dir=parent)
    os.replace(path, os.path.join(gone, name))
    shutil.rmtree(gone)


def remove_temporaries(folder: str) -> list[str]:
    """Delete the temporary entries (:data:`TMP_PREFIX`) a crashed writer left in ``folder``; return their names."""
    gone = []
    try:
        names = os.listdir(folder)
    except OSError:
        return gone
    for name in names:
        if not is_temporary(name):
            continue
        p = os.path.join(folder, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        gone.append(name)
    return gone
