"""Writes that appear whole or not at all: a temporary sibling, then a rename.

Every file and folder adaprune writes (plans, checkpoints, reports, score caches, plots) goes
through here, so that a full disk, an exception or an interrupt half way leaves the previous
version intact (or nothing), never half a file. The checks at the end let a command refuse an
output path before it starts any work, rather than fail once the work is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError


def cache_dir() -> Path:
    """The cache directory: ``$ADAPRUNE_CACHE`` if set, else ``~/.cache/adaprune``."""
    env = os.environ.get("ADAPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaprune"


def _temporary_sibling(path: Path, directory: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    handle, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(handle)
    return Path(name)


def _fsync(path: Path) -> None:
    """Flush a file (or every file under a folder) to disk, so that the rename never outruns the data."""
    files = [path] if path.is_file() else [Path(root) / name for root, _, names in os.walk(path) for name in names]
    for file in files:
        if file.is_symlink():
            continue
        handle = os.open(file, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold SIGINT back for a few system calls, so that an interrupt cannot split a swap in two."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file beside `path` to write; on success it replaces `path` in one rename.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is
    left as it was.
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        tmp = _temporary_sibling(target, directory=False)
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; on success it becomes `path`.

    An existing `path` is replaced only with `overwrite`, and only once the new folder is
    complete: the two are swapped in one step where the system can (Linux), otherwise the old one
    is renamed aside and the new one renamed in with interrupts held back; then the old one is
    deleted. On any exception the temporary folder is deleted and `path` is left as it was.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file, not a folder")
    tmp: Path | None = None
    try:
        tmp = _temporary_sibling(target, directory=True)
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _fsync(tmp)
        with _no_interrupt():
            if not target.exists():
                os.rename(tmp, target)
            elif not _exchange(tmp, target):
                old = _temporary_sibling(target, directory=True)
                os.rmdir(old)
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                tmp = old
            # After the swap, `tmp` holds the old folder (or nothing): deleted below.
            _fsync_folder(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if tmp is not None and tmp.exists() and tmp.resolve() != target.resolve():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- checks before any work ----------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path.cwd()


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in `folder`: tried, not guessed (root, read-only mounts, ACLs)."""
    try:
        handle, name = tempfile.mkstemp(prefix=".adaprune-probe-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


def check_writable_file(path: str | os.PathLike[str], option: str,
                        inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse, before any work, a file path that cannot be written; `option` names it in the message.

    Missing parent folders are fine (they are created); a parent that is a file, a path that is a
    folder, one of the `inputs` or a file inside one, or a folder adaprune cannot create files in is not.
    """
    target = Path(path)
    resolved = target.resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if resolved == source_resolved or source_resolved in resolved.parents:
            raise OutputError(f"{option} {path} would overwrite the input {source}; write it somewhere else.")
    if target.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file path inside it, e.g. {target / 'out.json'}.")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputError(f"{option} {path} cannot be written: {existing} is a file, not a folder. Choose a path "
                          "whose parent is a folder.")
    if not _can_create_in(existing):
        raise OutputError(f"{option} {path} cannot be written: no permission to create files in {existing}. Choose "
                          "a path in a folder you can write to.")
    return target


def check_output_folder(path: str | os.PathLike[str], option: str, overwrite: bool = False,
                        inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse, before any work, an output folder that cannot or must not be written.

    A file is refused; a non-empty folder unless `overwrite`; a folder that is, holds or lies
    inside one of the `inputs` always (replacing it would destroy the input).
    """
    target = Path(path)
    resolved = target.resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if resolved == source_resolved or source_resolved in resolved.parents:
            raise OutputError(f"{option} {path} is (or is inside) the input {source}; write the result to another "
                              "folder, so that the input stays intact.")
        if resolved in source_resolved.parents:
            raise OutputError(f"{option} {path} holds the input {source}; replacing it would delete the input. Write "
                              "the result to another folder.")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{option} {path} is a file; give a folder path (it is created).")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"{option} {path} is not empty; pass --overwrite to replace it (the old content is replaced "
                          "only once the new one is complete), or choose another folder.")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise OutputError(f"{option} {path} cannot be created: {existing} is a file, not a folder.")
    if not _can_create_in(existing):
        raise OutputError(f"{option} {path} cannot be created: no permission to create files in {existing}. Choose "
                          "a folder you can write to.")
    return target
