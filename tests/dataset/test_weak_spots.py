"""Weak spots of issue 23: control characters from files shown escaped (info, verify, import-weights,
predict), a manifest's settings range-checked, list files capped (line length, skipped entries kept),
and ``verify --repair`` refusing a shard linked out of the dataset before reading it."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.config import ImageSettings
from alexnet_pipe.dataset.manifest import load_dataset
from alexnet_pipe.errors import ConfigError, DatasetError, LayoutError
from alexnet_pipe.inputs.listfile import MAX_LINE_CHARS, MAX_SKIPPED_NAMED, scan_lists
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from alexnet_pipe.text import shown
from tests.helpers.datasets import shapes_dataset
from tests.helpers.images import smooth_image, write_jpeg

HOSTILE = "a\x1b[2Jb"  # ESC[2J: clears the screen when printed as itself
ESCAPED = "a\\x1b[2Jb"


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


def one_line_error(*args: str) -> str:
    code, out = cli(*args)
    assert code == 1 and len(out.strip().splitlines()) == 1 and out.startswith("Error: "), out
    assert "\x1b" not in out, out
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A copy of the converted dataset (its raw images stay where .convert-inputs.json says)."""
    return Path(shutil.copytree(pristine, tmp_path / "data", symlinks=True))


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


# ---------------------------------------------------------------- escaping


def test_shown_escapes_what_is_not_printable_and_keeps_the_rest():
    assert shown(HOSTILE) == ESCAPED
    assert shown("tench, Tinca tinca é 中") == "tench, Tinca tinca é 中"
    assert shown("\x9b2J \udcff \u202e\n") == "\\x9b2J \\udcff \\u202e\\x0a"  # C1 CSI, a surrogate, RLO, newline
    assert shown("x" * 500, 60) == "x" * 60 + "..."


def test_info_shows_class_ids_and_names_from_the_manifest_escaped(data):
    def change(m):
        m["classes"][0].update(id=HOSTILE, name="n\x1b]0;title\x07")
        m["skipped"].append({"split": "train", "name": "s\x1b[2J.jpg", "reason": "r\x1b[31m"})

    edit_manifest(data, change)
    code, out = cli("info", str(data))
    assert code == 0, out
    assert "\x1b" not in out and "\x07" not in out
    assert ESCAPED in out and "n\\x1b]0;title\\x07" in out and "s\\x1b[2J.jpg: r\\x1b[31m" in out
    code, out = cli("info", str(data), "--json")  # JSON escapes them itself, and keeps them whole
    assert code == 0 and json.loads(out)["classes"][0]["id"] == HOSTILE


def test_a_manifest_refusal_shows_the_split_name_escaped(data):
    edit_manifest(data, lambda m: m["splits"].update({HOSTILE: {"records": "many"}}))
    out = one_line_error("info", str(data))
    assert f"splits.{ESCAPED}.records" in out, out


def test_a_neon_pickle_with_a_hostile_key_is_refused_with_the_key_escaped(tmp_path):
    src = tmp_path / "evil.p"
    src.write_bytes(pickle.dumps({HOSTILE: 1, "x" * 10_000: 2}, protocol=2))
    out = one_line_error("import-weights", str(src), "-o", str(tmp_path / "w.pt"))
    assert ESCAPED in out and "x" * 61 not in out and len(out) < 600, out
    assert not (tmp_path / "w.pt").exists()


def test_a_neon_layer_name_is_escaped_in_its_refusal(tmp_path):
    layer = {"type": "neon.layers.layer.Convolution", "config": {"name": HOSTILE}, "params": {"W": "text"}}
    src = tmp_path / "evil.p"
    src.write_bytes(pickle.dumps({"model": {"config": {"layers": [layer]}}}, protocol=2))
    out = one_line_error("import-weights", str(src), "-o", str(tmp_path / "w.pt"))
    assert f"parameter array 0 ({ESCAPED})" in out, out


def test_predict_shows_class_ids_and_names_from_the_weights_escaped(tmp_path):
    mc = AlexNetConfig(num_classes=2, crop=67)
    body = {"kind": "weights", "model": build_model(mc, generator=torch.Generator().manual_seed(0)).state_dict(),
            "model_config": mc.to_dict(),
            "data": {"classes": [HOSTILE, "c\x1b[31m"], "class_names": ["n\x1b]0;title\x07", "plain"],
                     "mean_rgb": [120.0, 110.0, 100.0], "std_rgb": None, "crop": 67, "short_side": 72,
                     "channel_order": "RGB", "value_range": [0, 255]}}
    weights = tmp_path / "w.pt"
    checkpoint.save(weights, body)
    image = write_jpeg(tmp_path / "img.jpg", smooth_image(0, 96, 72))
    code, out = cli("predict", "-b", "cpu", "--model-file", str(weights), str(image))
    assert code == 0, out
    assert "\x1b" not in out and "\x07" not in out, out
    assert ESCAPED in out and "c\\x1b[31m" in out and "n\\x1b]0;title\\x07" in out, out


# ---------------------------------------------------------------- manifest settings

SETTINGS = {
    "short_side 1e9": ({"short_side": 10**9}, "settings.short_side"),
    "short_side negative": ({"short_side": -1}, "settings.short_side"),
    "short_side a float": ({"short_side": 256.0}, "settings.short_side"),
    "shard_size 0": ({"shard_size": 0}, "settings.shard_size"),
    "quality 101": ({"quality": 101}, "settings.quality"),
    "min_short_side 1e9": ({"min_short_side": 10**9}, "settings.min_short_side"),
    "squash 1e9 high": ({"resize": "squash", "resize_height": 10**9, "resize_width": 256}, "settings.resize_height"),
    "squash without a width": ({"resize": "squash", "resize_height": 256}, "settings.resize_width"),
    "squash a string": ({"resize": "squash", "resize_height": "256", "resize_width": 256}, "settings.resize_height"),
    "resize unknown": ({"resize": "stretch"}, "settings.resize"),
    "upscale a string": ({"upscale": "no"}, "settings.upscale"),
    "max_pixels 0": ({"max_pixels": 0}, "settings.max_pixels"),
    "val_ratio 2": ({"val_ratio": 2}, "settings.val_ratio"),
}


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_each_setting_out_of_range_is_refused_naming_it(data, case):
    changes, field = SETTINGS[case]
    edit_manifest(data, lambda m: m["settings"].update(changes))
    with pytest.raises(DatasetError) as exc:
        load_dataset(data)
    assert field in str(exc.value) and len(str(exc.value).splitlines()) == 1, exc.value


def test_verify_and_train_refuse_a_short_side_of_1e9(data):
    edit_manifest(data, lambda m: m["settings"].update(short_side=10**9))
    assert "settings.short_side" in one_line_error("verify", str(data), "--quick", "--no-progress")
    assert "settings.short_side" in one_line_error("train", "-w", str(data), "-b", "cpu", "-e", "1")


def test_the_settings_convert_writes_pass_and_convert_refuses_a_side_past_the_limit(data):
    load_dataset(data)  # what convert wrote passes
    with pytest.raises(ConfigError, match="65536"):
        ImageSettings(short_side=70_000)
    with pytest.raises(ConfigError, match="65536"):
        ImageSettings(resize="squash", resize_height=70_000, resize_width=256)


# ---------------------------------------------------------------- list files


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    for i in range(2):
        write_jpeg(raw / f"a{i}.jpg", smooth_image(i, 64, 48))
    return raw


def test_a_list_line_longer_than_path_max_is_refused_at_the_cost_of_the_line(tmp_path):
    raw = _raw(tmp_path)
    lst = tmp_path / "train.txt"
    lst.write_text("a0.jpg 0\na1.jpg 1\n" + "\x1b[2J" + "x" * 16_000_000 + " 0\n")
    tracemalloc.start()
    try:
        with pytest.raises(LayoutError) as exc:
            scan_lists(raw, lst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(exc.value)
    assert f"{lst}:3: the line is longer than {MAX_LINE_CHARS:,} characters" in msg, msg
    assert len(msg) < 500 and "\x1b" not in msg, msg
    assert peak < 2 << 20, peak  # before: the whole 16 MB line, several times over
    assert "line is longer" in one_line_error("convert", str(raw), str(tmp_path / "out"), "--list", str(lst),
                                              "--workers", "1", "--no-progress")


def test_a_path_of_path_max_bytes_still_lists(tmp_path):
    raw = _raw(tmp_path)
    lst = tmp_path / "train.txt"
    lst.write_text("a0.jpg 0\n" + "d/" * 2047 + "x.jpg 1\n")  # a 4,099-character path: missing, not refused
    found = scan_lists(raw, lst)
    assert [s.reason.split(": ", 1)[1] for s in found.skipped] == ["no such file under RAW"]


def test_many_missing_list_entries_keep_the_first_thousand_named_and_every_count(tmp_path):
    raw = _raw(tmp_path)
    missing = 2 * MAX_SKIPPED_NAMED + 500
    lst = tmp_path / "train.txt"
    lst.write_text("a0.jpg 0\na1.jpg 1\n" + "".join(f"gone/{i}.jpg {i % 2}\n" for i in range(missing))
                   + "a0.jpg 0\n")  # and one listed twice
    out = tmp_path / "out"
    code, text = cli("convert", str(raw), str(out), "--list", str(lst), "--workers", "1", "--no-progress")
    assert code == 0 and f"2 records, {missing + 1} skipped" in text, text
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["skipped"]) == MAX_SKIPPED_NAMED + 1
    assert m["skipped"][0]["name"] == "gone/0.jpg" and "count" not in m["skipped"][0]
    rest = m["skipped"][-1]
    assert rest["count"] == missing + 1 - MAX_SKIPPED_NAMED, rest
    assert "no such file under RAW: 1,500" in rest["reason"] and "listed again: 1" in rest["reason"], rest
    assert m["splits"]["train"]["skipped"] == missing + 1 and m["splits"]["train"]["inputs"] == missing + 3
    code, text = cli("info", str(out))
    assert code == 0 and f"2 records in 1 shard, 24.0 KiB, {missing + 1} skipped" in text.replace("\n", " "), text
    assert cli("verify", str(out), "--quick", "--no-progress")[0] == 0


@pytest.mark.faults
def test_a_200_mb_list_line_costs_megabytes_not_gigabytes(tmp_path):
    """The reported bomb through the real CLI in a process of its own: one line, little memory."""
    raw = _raw(tmp_path)
    lst = tmp_path / "train.txt"
    with open(lst, "w") as f:
        f.write("a0.jpg 0\na1.jpg 1\n")
        for _ in range(200):
            f.write("x" * 1_000_000)
        f.write(" 0\n")
    # VmHWM, not ru_maxrss: that one is kept across fork and exec, so it would be the test runner's own peak.
    script = ("import sys; from alexnet_pipe.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
              "    print('maxrss_kb', hwm, 'rc', e.code)")
    done = subprocess.run([sys.executable, "-c", script, "convert", str(raw), str(tmp_path / "out"), "--list",
                           str(lst), "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert "line is longer" in done.stderr and len(done.stderr) < 1000, done.stderr[:2000]
    maxrss_kb = int(done.stdout.split()[1])
    assert done.stdout.split()[3] == "1" and maxrss_kb < 400_000, done.stdout  # before: 1.65 GB


# ---------------------------------------------------------------- verify --repair and links


def test_verify_repair_refuses_a_shard_linked_outside_before_reading_it(data, tmp_path):
    shard = data / "lmdb" / "train-00000"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(shard, outside / "train-00000")
    (outside / "train-00000" / "data.mdb").write_bytes(b"not the shard")  # read, it would be "damaged"
    shard.symlink_to(outside / "train-00000", target_is_directory=True)
    out = one_line_error("verify", str(data), "--repair", "--no-progress")
    assert "lmdb/train-00000" in out and "leads outside" in out and "nothing to repair" not in out, out
    assert out.split("; ")[-1] == one_line_error("verify", str(data), "--no-progress").split("; ")[-1]  # same advice
    assert shard.is_symlink() and (outside / "train-00000" / "data.mdb").read_bytes() == b"not the shard"


def test_verify_repair_still_repairs_a_damaged_shard_inside(data):
    mdb = data / "lmdb" / "train-00000" / "data.mdb"
    good = mdb.read_bytes()
    mdb.write_bytes(good[:4096] + bytes(len(good) - 4096))
    code, out = cli("verify", str(data), "--repair", "--no-progress")
    assert code == 0 and "train-00000" in out and mdb.read_bytes() == good, out
