"""Raw inputs beyond class folders: a flat val folder, the ILSVRC archives, the devkit's files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import scipy.io


def flat_val(raw: Path, n: int = 6) -> dict[str, str]:
    """Move val/<class>/* into a flat val/ with ILSVRC names; return {stem: wnid}."""
    truth = {}
    files = sorted((raw / "val").glob("*/*.jpg"))
    for i, f in enumerate(files, 1):
        stem = f"ILSVRC2012_val_{i:08d}"
        f.rename(raw / "val" / f"{stem}.JPEG")
        truth[stem] = f.parent.name
    for d in (raw / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    return truth


def make_archives(raw: Path, dst: Path, truth: dict[str, str] | None = None) -> None:
    """Pack raw/train/<c>/* as ILSVRC2012_img_train.tar (a tar of per-class tars) and a flat val tar."""
    dst.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dst / "ILSVRC2012_img_train.tar", "w") as outer:
        for cls_dir in sorted((raw / "train").iterdir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted(cls_dir.iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{cls_dir.name}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    with tarfile.open(dst / "ILSVRC2012_img_val.tar", "w") as val:
        for f in sorted((raw / "val").glob("*.JPEG")):
            val.add(f, arcname=f.name)


GT = "ILSVRC2012_validation_ground_truth.txt"


# The devkit's id order (id 1 = "cat"), a derangement of sorted order: with a sorted list every
# single image would get a wrong class, so each assertion below fails if the order is ignored.
DEVKIT_ORDER = ("cat", "ant", "bee")


MAT_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")


# Internal WordNet nodes: ids above the classes, num_children > 0, wnids that are no class.
INTERNAL = (("n00015388", (1, 2, 3)), ("n00001740", (4,)))


def meta_mat_bytes(order=DEVKIT_ORDER, internal=INTERNAL) -> bytes:
    """A meta.mat shaped like ILSVRC2012_devkit_t12/data/meta.mat: a (N, 1) struct array with
    the devkit's eight fields, classes first (num_children 0), then internal nodes."""
    rows = [(i, wnid, f"{wnid} words", "gloss", 0, [], 0, 1300) for i, wnid in enumerate(order, 1)]
    rows += [(len(order) + k, wnid, "node", "gloss", len(kids), list(kids), 1, 0)
             for k, (wnid, kids) in enumerate(internal, 1)]
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in MAT_FIELDS])
    for r, row in enumerate(rows):
        for name, value in zip(MAT_FIELDS, row):
            # MATLAB stores numbers as 1x1 double matrices and children as a 1xK row.
            synsets[r, 0][name] = value if isinstance(value, str) else np.array(value, float).reshape(1, -1)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def map_clsloc_text(order=DEVKIT_ORDER) -> str:
    return "".join(f"{wnid} {i} {wnid}_name\n" for i, wnid in enumerate(order, 1))


def ground_truth(truth: dict[str, str], order=DEVKIT_ORDER) -> str:
    """Line k: the devkit id of the k-th image in sorted file-name order."""
    return "".join(f"{order.index(truth[stem]) + 1}\n" for stem in sorted(truth))


def devkit_tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    """``path`` as a devkit archive holding ILSVRC2012_devkit_t12/data/<name> for each file."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
