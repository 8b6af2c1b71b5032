"""Atomic file writes: a reader sees the old file or the complete new one, never half of it."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from models.errors import EdgeNasError

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    ensure_writable_dir(target.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    os.close(handle)
    # mkstemp creates the file as 0600; give the result the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text_atomic(target: PathLike, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_bytes_atomic(target: PathLike, data: bytes) -> None:
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)


def ensure_writable_dir(folder: PathLike) -> Path:
    """Create `folder` if needed and check that a file can be created in it."""
    folder = Path(folder) if str(folder) else Path(".")
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            raise EdgeNasError(f"cannot write to {folder}: {part} is a file, not a folder; choose another location")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=str(folder), prefix=".edge-nas-probe-"):
            pass
    except OSError as error:
        raise EdgeNasError(f"cannot write to {folder}: {error.strerror or error}; choose a writable location") from None
    return folder
