"""The one escaping of text that reaches a terminal, a TSV line or a rich table.

File and class names come from users' folders: they may hold ESC (a terminal obeys it), line breaks (a TSV
row or an error line splits), bytes that are not UTF-8 (Python holds them as lone surrogates, which printing
refuses with UnicodeEncodeError after all the work is done) or rich markup such as `[/]` (rich raises
MarkupError). Every such name goes through `printable` (plain output) or `markup` (rich output) here.
"""

from __future__ import annotations

import os


def printable(text: object, *, keep_tab: bool = False) -> str:
    """`text` with control characters escaped (\\n, \\x1b, ...) and undecodable bytes as \\xNN: one safe line."""
    out = []
    for char in str(text):
        if "\udc80" <= char <= "\udcff":  # a byte os.fsdecode could not decode (surrogateescape)
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable() or (keep_tab and char == "\t"):
            out.append(char)
        else:
            out.append(repr(char)[1:-1] if char not in "'\"" else char)
    return "".join(out)


def markup(text: object) -> str:
    """`text` for a rich console or table: printable, and its square brackets taken literally."""
    from rich.markup import escape

    return escape(printable(text))


def portable_name(path: str | os.PathLike[str]) -> str:
    """A file name for a UTF-8 file (a CSV): the name itself where it decodes, its undecodable bytes as \\xNN."""
    return printable(os.fspath(path), keep_tab=True) if _undecodable(os.fspath(path)) else os.fspath(path)


def _undecodable(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)
