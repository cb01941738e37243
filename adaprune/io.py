"""Writes that appear whole or not at all: a temporary sibling, then a rename.

Every file and folder adaprune writes (plans, checkpoints, reports, score caches, plots) goes
through here, so that a full disk, an exception or an interrupt half way leaves the previous
version intact (or nothing), never half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file beside `path` to write; on success it replaces `path` in one rename.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is
    left as it was.
    """
    target = Path(path)
    tmp = _temporary_sibling(target, directory=False)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; on success it becomes `path`.

    An existing `path` is replaced only with `overwrite`, and only once the new folder is
    complete: it is renamed aside, the new one renamed in, then the old one deleted. On any
    exception the temporary folder is deleted and `path` is left as it was.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists")
    tmp = _temporary_sibling(target, directory=True)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():
            old = _temporary_sibling(target, directory=True)
            os.rmdir(old)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
