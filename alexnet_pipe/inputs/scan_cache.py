"""The scan cache: the member lists of the ILSVRC archives kept between scans (``OUT/.scan-cache/``).

Listing ILSVRC2012_img_train.tar takes minutes of tar headers; with a cache folder, the lists
(``archives.Members``) of an unchanged archive are read back in well under a second. The cache
only saves time: a stale, foreign or malformed file is ignored and rewritten, and failing to
write one never fails a scan.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from alexnet_pipe.fsutil import atomic_write_bytes
from alexnet_pipe.inputs.archives import Members

log = logging.getLogger(__name__)

CACHE_FORMAT = "alexnet-pipe scan cache"
CACHE_VERSION = 3  # 3: archives checked to their end-of-archive marker; skipped members kept


# The scan cache: one .npz file per archive (numpy arrays only, read with allow_pickle=False):
# "key" (the archive's resolved path, size and mtime, as one JSON string), "groups" (the group
# names, NUL-separated), the Members columns, and "skipped" (JSON: [[member, reason], ...]).
# Only an archive read to its end-of-archive marker is cached. About 45 bytes per member: ~58 MB for
# ILSVRC2012_img_train.tar, read back in well under a second instead of minutes of tar headers.
# Another path, size or mtime means the archive changed (or the file belongs to another one)
# and it is listed again; a file that is not well formed is ignored and rewritten.


def _cache_key(archive: Path, kind: str) -> str:
    resolved = archive.resolve()
    st = resolved.stat()
    return json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": kind, "archive": str(resolved),
                       "size": st.st_size, "mtime_ns": st.st_mtime_ns}, sort_keys=True)


def _cache_file(cache_dir: Path, archive: Path, kind: str) -> Path:
    digest = hashlib.sha256(f"{kind}\0{archive.resolve()}".encode()).hexdigest()[:16]
    return cache_dir / f"{archive.name}.{digest}.npz"


def _load_cache(path: Path, key: str, archive_size: int) -> Members | None:
    """The cached members of the archive ``key`` describes; None if absent, stale or malformed."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            groups = bytes(z["groups"]).decode("utf-8", "surrogateescape").split("\0")
            skipped = json.loads(str(z["skipped"]))
            members = Members(groups, z["group_ends"], bytes(z["names"]), z["name_ends"], z["offsets"], z["sizes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RecursionError):
        return None
    if not (isinstance(skipped, list)
            and all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in skipped)):
        return None
    members.skipped = [(name, reason) for name, reason in skipped]
    n = len(members.offsets)
    columns_ok = (
        all(a.dtype == np.int64 and a.ndim == 1 for a in (members.group_ends, members.name_ends, members.offsets,
                                                          members.sizes))
        and len(members.name_ends) == len(members.sizes) == n and len(members.group_ends) == len(groups) > 0
        and bool(np.all(np.diff(members.group_ends) >= 0)) and members.group_ends[0] >= 0
        and members.group_ends[-1] == n and bool(np.all(np.diff(members.name_ends) >= 0))
        and (n == 0 or (members.name_ends[0] >= 0 and members.name_ends[-1] == len(members.names)))
    )
    if not columns_ok:
        return None
    if n and (members.offsets.min() < 0 or members.sizes.min() < 0
              or (members.offsets + members.sizes).max() > archive_size):
        return None
    return members


def _save_cache(path: Path, key: str, members: Members) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), groups=np.frombuffer("\0".join(members.groups).encode("utf-8", "surrogateescape"),
                                                          np.uint8),
             group_ends=members.group_ends, names=np.frombuffer(members.names, np.uint8), name_ends=members.name_ends,
             offsets=members.offsets, sizes=members.sizes, skipped=np.array(json.dumps(members.skipped)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:  # the cache only saves time: never fail a scan over it
        log.warning("could not write the scan cache %s (%s); the next scan lists the archive again", path, exc)


def cached_members(archive: Path, kind: str, read: Callable[[Path], Members], cache_dir: Path | None) -> Members:
    """``read(archive)``, through the cache in ``cache_dir`` when one is given."""
    if cache_dir is None:
        return read(archive)
    key = _cache_key(archive, kind)  # stat before reading: a change during the read shows next time
    path = _cache_file(cache_dir, archive, kind)
    members = _load_cache(path, key, archive.resolve().stat().st_size)
    if members is not None:
        log.info("member list of %s read from the scan cache %s", archive.name, path)
        return members
    members = read(archive)
    _save_cache(path, key, members)
    return members
