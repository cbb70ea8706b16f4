"""Writing files so that an interrupted run never leaves a partial one behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Calls ``write`` on a temporary sibling of ``path``, then renames it to ``path``.

    An interruption leaves either the old ``path`` or the new one, never a partial file,
    and no temporary file. A unique sibling name keeps the rename on one file system.
    """
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    try:
        write(tmp_path)

        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)

        raise


def write_lines_atomically(path: Path, lines: Iterable[str]) -> None:
    """Writes ``lines``, each followed by a newline, to ``path`` with :func:`write_atomically`."""
    text = "".join(f"{line}\n" for line in lines)

    write_atomically(path, lambda tmp_path: tmp_path.write_text(text, encoding="utf-8"))
