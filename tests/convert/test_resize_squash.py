"""convert --resize squash and --resize-height/--resize-width: Caffe's geometry (convert_imageset,
256x256 in bvlc_reference_caffenet's recipe). Every stored image has exactly the asked size whatever
its aspect and orientation; the manifest and OUT's identity record it; bad combinations are one line;
the default conversion does not record it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.cli import main
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.dataset.records import RecordReader, record_table, source_names
from alexnet_pipe.errors import ConfigError
from tests.helpers.images import smooth_image

# Upright (display) sizes, width x height, and how each is written: every aspect, both decoders,
# EXIF rotation on each, an image smaller than the target and one already at the target (kept as it is).
KINDS = {
    "wide.jpg": (120, 60, "jpeg"),
    "tall.png": (50, 140, "png"),
    "turned.jpg": (120, 60, "exif6-jpeg"),  # stored sideways (60 x 120), EXIF orientation 6
    "turned.png": (44, 130, "exif6-png"),
    "tiny.jpg": (30, 20, "jpeg"),
    "exact.jpg": (80, 48, "baseline"),  # already 80 x 48: its own bytes are stored
}


def write(path: Path, display: np.ndarray, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind.startswith("exif6"):
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 clockwise to view": the stored pixels are the display turned back
        stored = Image.fromarray(np.ascontiguousarray(np.rot90(display, 1)))
        stored.save(path, "JPEG" if kind.endswith("jpeg") else "PNG", exif=exif, **({"quality": 95}
                                                                                     if kind.endswith("jpeg") else {}))
    elif kind == "png":
        Image.fromarray(display).save(path, "PNG")
    else:
        Image.fromarray(display).save(path, "JPEG", quality=90 if kind == "baseline" else 95)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """train/ and val/ with two classes; {relative path: the upright pixels}."""
    root = tmp_path_factory.mktemp("squash") / "raw"
    shown = {}
    for s, split in enumerate(("train", "val")):
        for c, cls in enumerate(("ant", "bee")):
            for k, (name, (w, h, kind)) in enumerate(KINDS.items()):
                display = smooth_image(100 * s + 10 * c + k, w, h)
                write(root / split / cls / name, display, kind)
                shown[f"{split}/{cls}/{name}"] = display
    return root, shown


def convert(raw: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["convert", str(raw), str(out), "--workers", "1", "--no-progress", *args])


def stored(out: Path) -> dict[str, np.ndarray]:
    """Every stored image, decoded to RGB, by the name of its input."""
    ds = load_dataset(out)
    images = {}
    for split in ("train", "val"):
        reader = RecordReader(record_table(ds, split, "lmdb"))
        try:
            for i, name in enumerate(source_names(ds, split, list(range(len(reader.table))))):
                jpeg, _ = reader.read(i)
                bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
                images[f"{split}/{name}"] = (jpeg, bgr[..., ::-1])
        finally:
            reader.close()
    return images


@pytest.mark.parametrize("args, size", [(("--resize", "squash", "--short-side", "64"), (64, 64)),
                                        (("--resize-height", "48", "--resize-width", "80"), (48, 80))])
def test_every_image_is_stored_at_exactly_the_squash_size(raw, tmp_path, args, size):
    """Whatever its aspect, decoder, orientation or size, each image is stored at H x W, its upright
    pixels resized to it (compared with a plain OpenCV resize of the upright original)."""
    root, shown = raw
    res = convert(root, tmp_path / "out", *args)
    assert res.exit_code == 0, res.output
    images = stored(tmp_path / "out")
    assert sorted(images) == sorted(shown)
    h, w = size
    for name, (_, rgb) in images.items():
        assert rgb.shape == (h, w, 3), name
        reference = cv2.resize(shown[name], (w, h), interpolation=cv2.INTER_AREA if h * w < shown[name].size // 3
                               else cv2.INTER_CUBIC).astype(np.float32)
        turned = cv2.resize(np.ascontiguousarray(np.rot90(shown[name], 1)), (w, h)).astype(np.float32)
        error = float(np.abs(rgb - reference).mean())
        assert error < 4.0, (name, error)  # JPEG and filter differences only
        assert error < float(np.abs(rgb - turned).mean()) / 3, name  # and upright, not the raw pixels squashed
    if size == (48, 80):  # a clean baseline JPEG already of the size is stored as it is
        assert images["train/ant/exact.jpg"][0] == (root / "train" / "ant" / "exact.jpg").read_bytes()

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {k: manifest["settings"][k] for k in ("resize", "resize_height", "resize_width", "short_side")} \
        == {"resize": "squash", "resize_height": h, "resize_width": w, "short_side": min(h, w)}
    assert manifest["resize"]["squash"] == {"height": h, "width": w}
    assert "aspect ratio ignored" in manifest["resize"]["rule"] and "convert_imageset" in manifest["resize"]["rule"]
    assert load_dataset(tmp_path / "out").meta.settings.squash == (h, w)
    assert manifest["mean_image"]["size"] == min(h, w)  # the centre box every stored image has


def test_squash_alone_and_its_size_given_are_the_same_conversion():
    """--resize squash (256 x 256 from --short-side's default) and --resize-height 256 --resize-width 256
    record the same settings, so one resumes the other."""
    a = ImageSettings(resize="squash")
    b = ImageSettings(resize="squash", resize_height=256, resize_width=256)
    assert a == b and a.squash == (256, 256)
    src = Path("raw")
    assert ConvertConfig(src, src, image=a).settings() == ConvertConfig(src, src, image=b).settings()


def test_a_resume_with_the_other_geometry_is_refused_in_one_line(raw, tmp_path):
    root, _ = raw
    out = tmp_path / "out"
    assert convert(root, out, "--resize", "squash", "--short-side", "64").exit_code == 0
    for args in ((), ("--resize-height", "64", "--resize-width", "80")):
        res = convert(root, out, "--short-side", "64", *args) if not args else convert(root, out, *args)
        assert res.exit_code != 0 and "Traceback" not in res.output
        errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "other settings" in errors[0] and "resize" in errors[0], res.output
    again = convert(root, out, "--resize-height", "64", "--resize-width", "64")  # the same geometry: resumes
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("args, words", [
    (("--resize-height", "64"), "--resize-height and --resize-width go together"),
    (("--resize-height", "64", "--resize-width", "64", "--short-side", "128"), "--short-side sizes the squash"),
    (("--resize", "short-side", "--resize-height", "64", "--resize-width", "64"), "need --resize squash"),
    (("--resize", "squash", "--no-upscale"), "drop --no-upscale"),
    (("--resize", "squash", "--short-side", "0"), "needs a size"),
    (("--resize", "stretch"), "Invalid value for '--resize'"),
])
def test_bad_geometry_options_are_one_line(raw, tmp_path, args, words):
    res = convert(raw[0], tmp_path / "out", *args)
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert words in res.output, res.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_default_records_no_geometry(tmp_path):
    """The default (short side) adds nothing to the settings: earlier conversions resume, manifests
    are as before."""
    settings = ConvertConfig(Path("raw"), tmp_path, image=ImageSettings()).settings()
    assert not {"resize", "resize_height", "resize_width"} & set(settings)
    assert ImageSettings().squash is None
    with pytest.raises(ConfigError, match="go together"):
        ImageSettings(resize="squash", resize_width=10)
