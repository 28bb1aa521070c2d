"""Wording shared by every message: counts with the noun in the right number."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 shard"``, ``"2 shards"``; ``many`` for irregular plurals (``plural(n, "class", "classes")``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"
