"""Where worker processes come from: a forkserver that imported their code once.

The converter's and the verifier's workers import only light modules (no torch: ~2.5 s per
process); a forkserver pays those imports once and its children share the pages. Unlike a plain
fork, a child never inherits this process's threads or locks (it may have imported torch). Spawn
where forkserver does not exist (Windows).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver


def worker_context(preload: str):
    """The multiprocessing context whose processes start from a server that imported ``preload``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([preload])
    return ctx


def start_early(preload: str) -> None:
    """Start the forkserver now, so that its imports (~0.3 s for the image code) run on another
    core while this process is still importing and scanning, not after."""
    if worker_context(preload).get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()
