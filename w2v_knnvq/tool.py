"""What the command-line tools of w2v-knnvq share."""

from __future__ import annotations

import argparse

from w2v_knnvq import __version__


def tool_parser(description: str | None, *, prog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser that keeps the layout of ``description`` (the tool's docstring)
    and answers ``--version``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    parser.add_argument("--version", action="version", version=f"w2v-knnvq {__version__}")

    return parser
