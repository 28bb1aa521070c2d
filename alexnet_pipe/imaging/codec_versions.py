"""The versions of the libraries that decide a conversion's bytes: OpenCV (resizing, PNG/WebP/...
decoding, JPEG encoding), simplejpeg (it bundles its own libjpeg-turbo: the JPEG decoder), Pillow
(other formats, EXIF, ICC) and NumPy. pyproject.toml leaves them floating, so OUT records them
(state file and manifest: ``"codecs"``): a resume, a --part run or a --repair with other versions
would mix two encodings in one dataset, and is refused (convert/output.py).
"""

from __future__ import annotations

import functools


@functools.cache
def codec_versions() -> dict[str, str]:
    """``{"opencv": ..., "simplejpeg": ..., "pillow": ..., "numpy": ...}`` of this process."""
    import cv2
    import numpy
    import PIL
    import simplejpeg

    return {"opencv": cv2.__version__, "simplejpeg": simplejpeg.__version__, "pillow": PIL.__version__,
            "numpy": numpy.__version__}


def codec_changes(recorded: object, now: dict[str, str]) -> str:
    """What differs between the recorded versions and ``now``, e.g. ``"opencv 4.9.0 -> 4.10.0"``;
    '' when the same, or when none are recorded (a conversion from before they were)."""
    if not isinstance(recorded, dict):
        return ""
    return "; ".join(f"{name} {recorded.get(name, 'unrecorded')} -> {now.get(name, 'absent')}"
                     for name in sorted(set(recorded) | set(now)) if recorded.get(name) != now.get(name))
