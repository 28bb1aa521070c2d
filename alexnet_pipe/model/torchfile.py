"""Bounds on a torch file, checked before ``torch.load`` reads (and inflates) anything.

``weights_only=True`` stops code from running, not memory from being asked for: torch allocates
each tensor's storage at the size the zip's central directory declares, so a 1 MB ``.pth`` whose
storage is deflated zeros asks for 1 GiB, an 8 MB one for 8 GiB (the SHA-256 trailer of our own
files proves integrity, not origin). ``problem`` reads only the zip's directory and refuses:

- more inflated bytes than any AlexNet file holds (``MAX_INFLATED``: the torchvision network's
  61M float32 parameters with SGD momentum buffers are about 0.5 GB);
- inflation: ``torch.save`` stores entries uncompressed, so the declared sizes of a genuine file
  add up to about its size on disk; a file re-zipped with deflate shrinks float weights by a few
  percent, never by ``MAX_RATIO``;
- more entries than a network's state (``MAX_ENTRIES``; ours hold about 40);
- torch's legacy (pre-1.6, non-zip) format, whose storages are sized by the pickle itself and so
  cannot be bounded before reading: re-save such a file with a current torch.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

MAX_INFLATED = 1 << 30  # bytes, all entries together
MAX_RATIO = 4  # declared bytes / bytes on disk (plus SLACK)
SLACK = 1 << 20  # small files: pickles and headers may deflate well
MAX_ENTRIES = 4096
ZIP_MAGIC = b"PK\x03\x04"


def problem(path: Path) -> str | None:
    """Why ``path`` must not reach ``torch.load`` (a phrase), or None: a torch zip within the bounds,
    or a file that is no zip at all only when it is not torch's legacy format either (torch.load
    then names what it is)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
        if head != ZIP_MAGIC:
            if head[:1] != b"\x80":  # no pickle either: torch.load names what it is
                return None
            return ("it is not a torch zip file: torch's legacy (pre-1.6) format cannot be checked before it is "
                    "read; load it with that torch and save it again with torch >= 1.6")
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return None  # unreadable as a zip: torch's own error names it, and it inflates nothing
    if len(infos) > MAX_ENTRIES:
        return f"its zip holds {len(infos):,} entries; a network's weights need a few dozen (limit {MAX_ENTRIES:,})"
    declared = sum(i.file_size for i in infos)
    if declared > MAX_INFLATED:
        return (f"its zip declares {declared:,} bytes once inflated; AlexNet's weights with momentum are about "
                f"0.5 GB (limit {MAX_INFLATED:,})")
    if declared > MAX_RATIO * size + SLACK:
        return (f"its zip declares {declared:,} bytes from {size:,} on disk (a zip bomb?); torch.save stores "
                "tensors uncompressed")
    return None
