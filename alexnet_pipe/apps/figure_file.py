"""Writing a matplotlib figure to a file, for the ``plot`` command, ``inspect`` and train's report.

The output's suffix picks the format (.png, .svg, .pdf); ``check_output`` refuses a path that
cannot be written before any drawing is done, and ``save_figure`` renders with Agg (no display,
no pyplot state) and replaces the file atomically: a viewer polling it sees the old drawing or
the new one, never half. matplotlib is imported inside ``save_figure``, so commands that draw
nothing (``convert``, ``info``) do not pay for it.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.fsutil import fsync_dir, output_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# Text stays text: searchable in SVG and PDF, and a tenth of the size of outlined glyphs.
RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "alexnet-pipe"}


def check_output(out: Path, example: str = "drawing.png") -> str:
    """The matplotlib format for ``out`` ("png", "svg" or "pdf"); raise when it cannot be written there.
    ``example``: the file name suggested inside a directory given as ``out``.

    Called before any drawing, so a wrong path costs no time.
    """
    out = Path(out)
    if out.is_dir():
        raise AlexnetPipeError(f"{out} is a directory; name a file in it, e.g. {out / example}")
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise AlexnetPipeError(f"{out}: the output must end in .png, .svg or .pdf (the suffix picks the format)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AlexnetPipeError(f"cannot write {out}: {parent} is a file, not a directory")
            break
    return fmt


def save_figure(fig: Figure, out: Path) -> Path:
    """Render ``fig`` in the format ``out``'s suffix names and replace ``out`` with it atomically.

    The drawing is rendered in memory first; the file is written aside in the same directory and
    renamed over ``out``, and the aside file is removed if anything fails. Parent folders are created.
    """
    import matplotlib

    out = Path(out)
    fmt = check_output(out)
    buf = io.BytesIO()
    metadata = {"Title": fig.get_label()} if fmt == "png" else {"Title": fig.get_label(), "Date": None}
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format=fmt, metadata=metadata)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(out.parent)
    except OSError as exc:  # a full disk, a file size limit: one line that says so (else the reason as it is)
        error = output_error(exc, out, "free some space (or pick another output path), then run the command again")
        if error is None:
            error = AlexnetPipeError(f"cannot write {out}: {exc.strerror or exc}; pick another output path")
        raise error from None
    return out
