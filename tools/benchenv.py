"""The machine-and-versions header shared by tools/scale_check.py and tools/bench_loader.py.

Imports nothing heavy: versions come from the installed package metadata, so the process that
orchestrates a measurement stays small.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def filesystem(path: Path) -> str:
    """Type of the filesystem holding ``path`` (fsync and page-cache behaviour differ a lot)."""
    try:
        best, kind = "", "unknown"
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, fstype, *_ = line.split()
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fstype
        return f"{kind} (mounted at {best})"
    except OSError:
        return "unknown"


def git_revision() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" with uncommitted changes" if dirty else "")


def version(dist: str, prefix: bool = False) -> str:
    """Installed version of ``dist`` (or of the first distribution whose name starts with it)."""
    try:
        if not prefix:
            return md.version(dist)
        for d in md.distributions():
            name = d.metadata["Name"] or ""
            if name.lower().startswith(dist):
                return f"{d.version} ({name})"
    except md.PackageNotFoundError:
        pass
    return "not installed"


def command_line() -> str:
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def header(work: Path) -> list[str]:
    """Markdown bullet lines: machine, OS, versions, revision, where the data lives."""
    cores = usable_cores()
    return [
        f"- machine: {cpu_model()}, {cores} usable cores (os.cpu_count {os.cpu_count()}), RAM {ram_gib()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}, torch {version('torch')}, DALI {version('nvidia-dali', prefix=True)}, "
        f"Pillow {version('pillow')}, lmdb {version('lmdb')}, numpy {version('numpy')}",
        f"- alexnet-pipe revision: {git_revision()}",
        f"- data written to: {work} on {filesystem(work)}",
    ]
