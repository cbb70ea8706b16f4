"""Writing files so that an interrupted run never leaves a partial one behind, and naming
local files in asset cards."""

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


def card_file_uri(path: Path) -> str:
    """The value of an asset card field (``checkpoint``, ``tokenizer``) that names the local
    ``path``, whatever letters it holds.

    fairseq2 turns a plain path into a percent-encoded ``file://`` URI and reads it back
    without decoding, so a space or a non-ASCII letter makes the file "not found"; a
    ``file://`` URI written out is taken as it stands.
    """
    return f"file://{path.absolute()}"
