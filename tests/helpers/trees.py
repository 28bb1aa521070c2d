"""Whole-tree snapshots: every file's bytes, and the names an atomic write leaves while in flight."""

from __future__ import annotations

import re
from pathlib import Path

TEMP = re.compile(r"\..+\.tmp-\d+")  # an atomic write's temporary file (fsutil.temp_path)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
