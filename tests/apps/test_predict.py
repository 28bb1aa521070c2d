"""predict: the validation preprocessing (checked against the real DALI loader over a real
conversion), weights from train and imported-style weights, the table, the JSON, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from alexnet_pipe.apps.predict import crop_anchor, expand_inputs, preprocess
from alexnet_pipe.cli import main
from alexnet_pipe.config import ImageSettings, TrainConfig
from alexnet_pipe.dataset.mean import load_dataset_mean
from alexnet_pipe.imaging.process import process
from alexnet_pipe.loading.open import epoch_loader
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from alexnet_pipe.model.inputspec import InputSpec
from tests.helpers.images import smooth_image

pytestmark = pytest.mark.usefixtures("torch_threads")  # two threads, restored after

CROP = 67  # the smallest crop the network takes: fast CPU passes
ORIENTATION = 0x0112
# One validation image per class, each taking another road through the converter. Name: (width,
# height, how it is written). Sizes give odd and even (size - crop), and short sides below the
# crop when converted with --short-side 60.
KINDS = {
    "a_jpeg": (500, 375, "jpeg"),
    "b_png": (300, 457, "png"),
    "c_webp": (333, 250, "webp"),
    "d_exif": (400, 300, "exif"),  # JPEG stored sideways with EXIF orientation 6
    "e_tiny": (41, 30, "png"),  # smaller than the crop: scaled up by the converter
    "f_kept": (107, 80, "baseline"),  # at short side 80 the converter keeps the file's own bytes
    "g_tall": (80, 301, "jpeg"),
}


def photo(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth gradient with noise: real JPEG work (chroma, DCT) and distinguishable images."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-40, 40, (height, width, 3))
    return np.clip(smooth_image(seed, width, height).astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_image(path: Path, arr: np.ndarray, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if kind == "png":
        im.save(path, "PNG")
    elif kind == "webp":
        im.save(path, "WEBP", quality=80)
    elif kind == "exif":
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif)
    else:
        im.save(path, "JPEG", quality=90 if kind == "baseline" else 93)
    return path


def suffix(kind: str) -> str:
    return {"png": ".png", "webp": ".webp"}.get(kind, ".jpg")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict") / "raw"
    for i, (cls, (w, h, kind)) in enumerate(KINDS.items()):
        for split in ("train", "val"):
            write_image(root / split / cls / f"x{suffix(kind)}", photo(2 * i + (split == "val"), w, h), kind)
    return root


def convert(raw: Path, out: Path, short_side: int) -> Path:
    """The real command line."""
    res = CliRunner().invoke(main, ["convert", str(raw), str(out), "--short-side", str(short_side),
                                    "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def data80(raw) -> Path:
    return convert(raw, raw.parent / "data80", 80)


def val_file(raw: Path, cls: str) -> Path:
    (path,) = (raw / "val" / cls).iterdir()
    return path


def tcfg(data: Path, **kw) -> TrainConfig:
    return TrainConfig(data_dir=data, **{"backend": "cpu", "datatype": "f32", "crop": CROP, "batch_size": 16,
                                         "progress": False, "data_threads": 1, **kw})


def dali_val(data: Path, normalize_std: bool = False) -> tuple[np.ndarray, list[int]]:
    """The validation split as the DALI CPU loader feeds the network: (N x 3 x crop x crop, labels)."""
    loader = epoch_loader(tcfg(data, normalize_std=normalize_std), 0, "val")
    try:
        (batch,) = list(loader)
        return batch.images.numpy(), batch.labels.tolist()
    finally:
        loader.close()


@pytest.mark.parametrize("short_side, normalize_std", [(80, False), (60, True)])
def test_preprocessing_is_the_dali_validation_pipeline(raw, data80, short_side, normalize_std):
    """Each image predict prepares equals what DALI's validation loader makes of the converted record:
    every format, EXIF rotation, upscaled tiny images, the pass-through of a clean JPEG, odd centre
    offsets, and at short side 60 crops that overhang the image (padding)."""
    data = data80 if short_side == 80 else convert(raw, raw.parent / "data60", 60)
    mean, std = load_dataset_mean(data).rgb()
    spec = InputSpec(crop=CROP, mean_rgb=mean, std_rgb=std if normalize_std else None, short_side=short_side)
    images, labels = dali_val(data, normalize_std)
    classes = sorted(KINDS)
    assert sorted(labels) == list(range(len(KINDS)))
    worst = 0.0
    for image, label in zip(images, labels):
        ours = preprocess(str(val_file(raw, classes[label])), spec)
        assert ours.shape == image.shape == (3, CROP, CROP)
        worst = max(worst, float(np.abs(ours - image).max()))
    # Measured: 0 with mean subtraction (the same libjpeg-turbo pixels, the same crop window);
    # with the std, float rounding of the division only.
    print(f"max abs difference from DALI: {worst:g}")
    assert worst <= (1e-5 if normalize_std else 0.0), worst
    if short_side == 60:  # the overhang really was exercised: zero (mean-coloured) borders
        assert (images == 0).all(axis=(1, 2)).any()


def test_centre_crop_starts_where_dali_puts_it():
    # roundf(0.5 * (size - crop)): halves away from zero
    assert [crop_anchor(s, c) for s, c in [(256, 224), (341, 224), (995, 224), (80, 67), (67, 67)]] \
        == [16, 59, 386, 7, 0]
    assert [crop_anchor(s, c) for s, c in [(60, 67), (61, 67), (66, 67)]] == [-4, -3, -1]


def test_exif_rotation_is_applied(tmp_path):
    """A PNG stored sideways with EXIF orientation 6 gives the same input as the upright PNG."""
    upright = photo(5, 90, 140)
    spec = InputSpec(crop=CROP, mean_rgb=(100.0, 110.0, 120.0), short_side=80)
    root = tmp_path
    write_image(root / "upright.png", upright, "png")
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(root / "sideways.png", exif=exif)
    a, b = preprocess(str(root / "upright.png"), spec), preprocess(str(root / "sideways.png"), spec)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, preprocess(str(root / "upright.png"), InputSpec(crop=CROP, short_side=80)))


def save_weights(path: Path, arch: str, classes: int, data: dict, seed: int = 0) -> torch.nn.Module:
    """A weights file of random values in the layout of ``arch``, with the data block ``data``."""
    cfg = AlexNetConfig(num_classes=classes, crop=CROP, arch=arch)
    model = build_model(cfg, generator=torch.Generator().manual_seed(seed), init="kaiming")
    block = {"classes": [f"n{i:08d}" for i in range(classes)], "class_names": [f"thing {i}" for i in range(classes)],
             "mean_rgb": [0.0, 0.0, 0.0], "std_rgb": None, "crop": CROP, "short_side": 80, "channel_order": "RGB",
             "value_range": [0, 255], **data}
    checkpoint.save(path, {"kind": "weights", "model": model.state_dict(), "model_config": cfg.to_dict(),
                           "data": block})
    return model.eval()


def predict_json(*args) -> tuple[int, list[dict], str]:
    res = CliRunner().invoke(main, ["predict", "-b", "cpu", "--json", *map(str, args)])
    assert "Traceback" not in res.output
    return res.exit_code, json.loads(res.stdout), res.stderr


def test_trained_weights_answer_as_the_validation_pipeline_scores(raw, data80, tmp_path):
    """`train` writes weights; predict's probabilities for the val files are the network's softmax
    on DALI's validation batch, class for class."""
    res = CliRunner().invoke(main, ["train", "-w", str(data80), "-e", "1", "-s", str(tmp_path / "w.pt"), "-b", "cpu",
                                    "--crop", str(CROP), "-z", "8", "--lr", "0.001", "--no-progress",
                                    "--eval-freq", "0"])
    assert res.exit_code == 0, res.output
    classes = sorted(KINDS)
    files = [val_file(raw, c) for c in classes]
    rc, answers, _ = predict_json("--model-file", tmp_path / "w.pt", "-z", "3", *files)
    assert rc == 0 and [a["path"] for a in answers] == [str(f) for f in files]

    body = checkpoint.load(tmp_path / "w.pt")
    model = build_model(AlexNetConfig.from_dict(body["model_config"]))
    model.load_state_dict(body["model"])
    images, labels = dali_val(data80)
    with torch.inference_mode():
        probs = torch.softmax(model.eval()(torch.from_numpy(images)), 1)
    for row, label in zip(probs, labels):
        top5 = answers[label]["top5"]
        assert len(top5) == 5 and [t["id"] for t in top5] == [classes[t["index"]] for t in top5]
        assert [t["name"] for t in top5] == [""] * 5  # folder names carry no names
        expected = row.topk(5)
        assert [t["index"] for t in top5] == expected.indices.tolist()
        assert [t["prob"] for t in top5] == pytest.approx(expected.values.tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random weights of the neon network, 3 classes (fewer than 5), RGB with a mean."""
    path = tmp_path_factory.mktemp("rgb") / "w.pt"
    save_weights(path, "neon", 3, {"mean_rgb": [120.0, 110.0, 100.0]}, seed=2)
    return path


@pytest.fixture(scope="module")
def bgr_unit(tmp_path_factory) -> tuple[Path, torch.nn.Module, dict]:
    """Imported-style weights: torchvision's network, BGR input in 0..1 with a mean and std."""
    data = {"channel_order": "BGR", "value_range": [0, 1], "mean_rgb": [0.485, 0.456, 0.406],
            "std_rgb": [0.229, 0.224, 0.225], "short_side": 80}
    path = tmp_path_factory.mktemp("bgr") / "tv.pt"
    return path, save_weights(path, "torchvision", 3, data, seed=1), data


def test_imported_bgr_unit_range_weights_get_their_normalisation(bgr_unit, tmp_path):
    """The network sees (BGR pixel / 255 - mean) / std of the centre crop: a forward pass written
    here from the converter's stored JPEG gives predict's probabilities; fewer classes than 5
    give that many entries."""
    path, model, data = bgr_unit
    image = write_image(tmp_path / "photo.jpg", photo(11, 150, 100), "jpeg")
    rc, (answer,), _ = predict_json("--model-file", path, image)
    assert rc == 0 and len(answer["top5"]) == 3
    assert {t["id"] for t in answer["top5"]} == {"n00000000", "n00000001", "n00000002"}
    assert all(t["name"] == f"thing {t['index']}" for t in answer["top5"])

    stored = process(image.read_bytes(), ImageSettings(short_side=80))
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(stored.jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert rgb.shape[:2] == (80, 120)  # 150 x 100 scaled to short side 80
    window = rgb[7:74, 27:94]  # the centre 67 x 67: (80 - 67) / 2 = 6.5 and (120 - 67) / 2 = 26.5 round up
    bgr = window[..., ::-1].astype(np.float32) / 255
    x = (bgr - np.array(data["mean_rgb"][::-1], np.float32)) / np.array(data["std_rgb"][::-1], np.float32)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]), 1)[0]
    got = {t["index"]: t["prob"] for t in answer["top5"]}
    assert [got[i] for i in range(3)] == pytest.approx(probs.tolist(), abs=1e-5)
    assert max(probs.tolist()) - min(probs.tolist()) > 1e-3  # the comparison can tell inputs apart


def test_formats_sizes_table_and_batching(raw, weights, tmp_path):
    """Every kind of file gets a top list; the batch size changes nothing; the table names them."""
    path = weights
    files = [val_file(raw, c) for c in sorted(KINDS)]
    files.append(tmp_path / "x.gif")
    Image.fromarray(photo(3, 40, 50)).save(files[-1], "GIF")
    _, one, _ = predict_json("--model-file", path, "-z", "1", *files)
    _, many, _ = predict_json("--model-file", path, "-z", "64", *files)
    assert [a["path"] for a in one] == [str(f) for f in files]
    for a, b in zip(one, many):
        assert [t["index"] for t in a["top5"]] == [t["index"] for t in b["top5"]]
        assert [t["prob"] for t in a["top5"]] == pytest.approx([t["prob"] for t in b["top5"]], abs=1e-5)
        assert sum(t["prob"] for t in a["top5"]) == pytest.approx(1.0, abs=1e-4)  # 3 classes: all of them
    table = CliRunner().invoke(main, ["predict", "-b", "cpu", "--model-file", str(path), str(files[0])])
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0] == str(files[0]) and len(lines) == 4
    assert lines[1].lstrip().startswith("1.") and "thing" in lines[1] and "%" in lines[1]


def test_unreadable_inputs_get_an_error_and_the_others_a_prediction(raw, weights, tmp_path):
    path = weights
    good = val_file(raw, "a_jpeg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    missing = tmp_path / "missing.png"
    rc, answers, err = predict_json("--model-file", path, cut, good, text, missing)
    assert rc == 1
    assert [a["path"] for a in answers] == [str(cut), str(good), str(text), str(missing)]
    assert "truncated" in answers[0]["error"] and "top5" not in answers[0]
    assert len(answers[1]["top5"]) == 3 and "error" not in answers[1]
    assert "not an image" in answers[2]["error"]
    assert answers[3]["error"] == "no such file or folder"
    assert "3 of 4 inputs could not be read" in err
    table = CliRunner().invoke(main, ["predict", "-b", "cpu", "--model-file", str(path), str(cut), str(good)])
    assert table.exit_code == 1 and "  error: truncated" in table.stdout and str(good) in table.stdout


def test_folders_expand_to_their_images_recursively_in_order(weights, tmp_path):
    top = tmp_path / "photos"
    write_image(top / "b.jpg", photo(1, 70, 70), "jpeg")
    write_image(top / "A" / "z.PNG", photo(2, 70, 70), "png")
    write_image(top / "A" / "deep" / "c.webp", photo(3, 70, 70), "webp")
    write_image(top / ".hidden" / "h.jpg", photo(4, 70, 70), "jpeg")
    write_image(top / ".h.jpg", photo(5, 70, 70), "jpeg")
    (top / "readme.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    items, passed = expand_inputs([top, tmp_path / "empty", top / "readme.txt"])
    assert [p for p, e in items if e is None] == [str(top / "A" / "deep" / "c.webp"), str(top / "A" / "z.PNG"),
                                                 str(top / "b.jpg"), str(top / "readme.txt")]
    assert [p for p, e in items if e is not None] == [str(tmp_path / "empty")]
    assert passed == [str(top / "readme.txt")]
    rc, answers, err = predict_json("--model-file", weights, top, tmp_path / "empty", top / "readme.txt")
    assert rc == 1 and "passed over 1 file" in err
    assert [("top5" in a) for a in answers] == [True, True, True, False, False]
    assert "holds no image files" in answers[3]["error"] and "not an image" in answers[4]["error"]


def test_bad_weights_file_is_one_line(tmp_path):
    image = write_image(tmp_path / "x.jpg", photo(0, 70, 70), "jpeg")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"PK\x03\x04 not really a zip")
    for weights, code, words in ((bogus, 1, "bogus.pt: not a readable torch file (RuntimeError: "),
                                 (tmp_path / "none.pt", 2, "does not exist")):
        res = CliRunner().invoke(main, ["predict", "-b", "cpu", "--model-file", str(weights), str(image)])
        assert res.exit_code == code and words in res.output and "Traceback" not in res.output
        assert len([line for line in res.output.splitlines() if line.startswith("Error:")]) == 1
    res = CliRunner().invoke(main, ["predict", "-b", "cpu", "--model_file", str(bogus), str(image)])  # neon spelling
    assert res.exit_code == 1 and "not a readable torch file" in res.output
    help_text = CliRunner().invoke(main, ["predict", "--help"]).output
    assert "--model-file" in help_text and "--model_file" not in help_text and "Examples:" in help_text


def test_short_side_zero_keeps_the_stored_sizes():
    """A dataset converted with --short-side 0 kept every image's size; so does predict."""
    assert InputSpec.from_data({"short_side": 0}, CROP).short_side == 0
    assert InputSpec.from_data({}, CROP).short_side == 256


def test_weights_from_a_squashed_dataset_predict_with_the_squash(raw, tmp_path):
    """`train` on a `convert --resize-height 72 --resize-width 96` dataset records the squash in its
    weights; predict then squashes every file (aspect ignored) before the centre crop: its input is
    DALI's validation batch exactly, and near a plain PIL resize to 96x72 then the centre crop."""
    data = tmp_path / "squashed"
    res = CliRunner().invoke(main, ["convert", str(raw), str(data), "--resize-height", "72", "--resize-width", "96",
                                    "--workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", "-w", str(data), "-e", "1", "-s", str(tmp_path / "w.pt"), "-b", "cpu",
                                    "--crop", str(CROP), "-z", "8", "--lr", "0.001", "--no-progress",
                                    "--eval-freq", "0"])
    assert res.exit_code == 0, res.output
    body = checkpoint.load(tmp_path / "w.pt")
    assert body["data"]["squash"] == [72, 96]
    spec = InputSpec.from_data(body["data"], CROP)
    assert spec.squash == (72, 96) and spec.geometry() == "squashed to 96x72"

    images, labels = dali_val(data)
    classes = sorted(KINDS)
    y0, x0 = crop_anchor(72, CROP), crop_anchor(96, CROP)
    for image, label in zip(images, labels):
        path = val_file(raw, classes[label])
        ours = preprocess(str(path), spec)
        assert np.array_equal(ours, image), classes[label]
        with Image.open(path) as im:
            from PIL import ImageOps

            upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((96, 72), Image.BICUBIC))
        reference = spec.normalize(upright[y0 : y0 + CROP, x0 : x0 + CROP])
        short_side = preprocess(str(path), InputSpec(crop=CROP, mean_rgb=spec.mean_rgb, short_side=72))
        error = float(np.abs(ours - reference).mean())
        assert error < 8.0, (classes[label], error)  # the converter's filter and JPEG on noisy pixels only
        w, h, _ = KINDS[classes[label]]
        if abs(w / h - 96 / 72) > 0.1:  # far from 4:3 (not f_kept, 107x80): the two rules differ
            assert error < float(np.abs(short_side - reference).mean()) / 2, classes[label]


def test_weights_without_a_squash_keep_the_short_side():
    """Weights files from before the field (and every non-Caffe import) resize the short side."""
    spec = InputSpec.from_data({"short_side": 80}, CROP)
    assert spec.squash is None and spec.geometry() == "short side 80" and "squash" not in spec.to_data()
    assert InputSpec.from_data({"squash": [256, 256]}, CROP).to_data()["squash"] == [256, 256]
