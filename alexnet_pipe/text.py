"""Wording shared by every message: counts with the noun in the right number, and text from files
shown escaped (``shown``)."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 shard"``, ``"2 shards"``; ``many`` for irregular plurals (``plural(n, "class", "classes")``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def shown(text: object, limit: int | None = None) -> str:
    """Text from a file (a key, a layer or class name, a path) made safe to print: every character
    that is not printable becomes an escape such as ``\\x1b`` (ESC would clear the screen or move
    the cursor; a newline would start a line that looks like ours; a lone surrogate, an undecodable
    byte kept by surrogateescape, cannot even be written to a UTF-8 terminal). With ``limit``, at
    most that many characters of the text are kept, then "...". Printable text comes back unchanged."""
    text = str(text)
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    return text + "..." if cut else text


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
