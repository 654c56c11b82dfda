"""Output files: checked before the work starts, written atomically, never overwritten silently.

One rule for every command: an output that already exists is refused unless the caller
passes ``force=True`` (the CLI's ``--force``). Every output path is checked with
:func:`check_output` (or :func:`check_output_dir`) *before* any work, so that a bad path is a
one-line error, not a traceback after an hour of evaluation. Files are written through
:func:`atomic_write_text` / :func:`atomic_path`: to a temporary file in the same folder,
flushed and fsynced, then renamed over the target, so that a killed run leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["OutputError", "check_output", "check_output_dir", "atomic_path", "atomic_write_text", "atomic_write_bytes"]


class OutputError(ValueError):
    """An output path that cannot or must not be written (the message names it)."""


def _check_parent(p: Path, what: str, *, folder: bool = False) -> None:
    """The nearest existing folder of the file ``p`` (of ``p`` itself when ``folder``) is a writable
    folder; errors name ``p`` as given."""
    parent = p if folder else (p.parent if str(p.parent) else Path("."))
    for anc in [parent, *parent.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise OutputError(f"{what} {str(p)!r}: {str(anc)!r} is a file, not a folder")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise OutputError(f"{what} {str(p)!r}: folder {str(anc)!r} is not writable")
            _probe(anc, p, what)
            break


def _probe(folder: Path, p: Path, what: str) -> None:
    """Create and remove a file in ``folder``: ``os.access`` says yes to root on a file system that
    refuses new files (``/proc``, ``/sys``, a full or read-only mount checked without ``W_OK``), where
    the atomic write at the end of a run would fail after all the work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".abfp-probe.", dir=str(folder))
    except OSError as e:
        raise OutputError(f"{what} {str(p)!r}: cannot create a file in folder {str(folder)!r} "
                          f"({e.strerror or e})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _refuse_special(p: Path, what: str) -> None:
    """An existing output that is not a regular file (``/dev/null``, a named pipe, a socket) is
    refused: the atomic write renames a new file over it, which would replace the device or the
    pipe itself by a plain file (as root, ``/dev/null`` for every program on the machine)."""
    if p.exists() and not p.is_file():
        raise OutputError(f"{what} {str(p)!r} is not a regular file (a device, a pipe or a socket), which the "
                          "atomic write would replace by a plain file: give a file name")


def check_output(path: str | os.PathLike, *, force: bool = False, what: str = "output file") -> Path:
    """Check that ``path`` can be written as a file, before any work is done.

    Raises :class:`OutputError` when ``path`` is a folder, lies under a file, its folder is not
    writable (a file is created there and removed again to be sure), or it exists and ``force``
    is false. Leaves nothing behind.
    """
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{what} {str(path)!r} is not a file name")
    if p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a folder; give a file name")
    _refuse_special(p, what)
    _check_parent(p, what)
    if p.exists() and not force:
        raise OutputError(f"{what} {str(p)!r} exists; pass --force to overwrite it")
    return p


def check_output_dir(path: str | os.PathLike, names: list[str] | tuple[str, ...] = (), *, force: bool = False,
                     what: str = "output folder") -> Path:
    """Check that ``path`` can be (or is) a folder and that the files ``names`` inside it may be
    written: each existing one needs ``force``. Leaves nothing behind."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a file, not a folder")
    _check_parent(p, what, folder=True)
    for n in names:
        _refuse_special(p / n, what)
    if not force:
        existing = [n for n in names if (p / n).exists()]
        if existing:
            raise OutputError(f"{what} {str(p)!r} already holds {', '.join(existing)}; pass --force to overwrite")
    return p


def _file_mode(p: Path) -> int:
    """The permission bits of a file written to ``p``: the old file's when it exists, else
    ``0o666`` less the process umask (what ``open(p, "w")`` gives)."""
    try:
        return p.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``
    (atomic on POSIX), on an exception it is removed and ``path`` is left as it was.

    ``suffix`` ends the temporary file's name (e.g. ``".tmp.png"`` for a writer that picks its
    format from the extension)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=str(p.parent))
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        with contextlib.suppress(OSError):  # mkstemp makes 0600, and a writer may make the file anew (safetensors
            os.chmod(tmp_p, _file_mode(p))  # keeps 0600): give it the mode a plain open() would, once written
        with open(tmp_p, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_p, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_p.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(str(p.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
