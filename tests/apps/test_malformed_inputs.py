"""Hostile inputs, round two (issue 23): JSON lines nested past the parser's depth, .npy and
BlobProto means that declare huge or empty shapes, and FIFOs or devices where a file is read."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from numpy.lib import format as npy_format

from alexnet_pipe.apps.predict import expand_inputs
from alexnet_pipe.cli import main
from alexnet_pipe.errors import ConfigError
from alexnet_pipe.formats import protobuf as pb
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from alexnet_pipe.train.loggers import MetricsLog
from tests.helpers.datasets import tree_dataset
from tests.helpers.images import smooth_image, write_jpeg

DEEP = 100_000
BOMBS = {"arrays": "[" * DEEP + "]" * DEEP, "objects": '{"a":' * DEEP + "1" + "}" * DEEP,
         "mixed": '{"a":[' * (DEEP // 2) + "1" + "]}" * (DEEP // 2)}
GOOD_ROW = json.dumps({"epoch": 1, "train_loss": 2.0, "lr": 0.01})


def run(*args) -> tuple[int, str, list[warnings.WarningMessage]]:
    """The CLI in this process: exit code, output, and the warnings raised while it ran."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(res.exception, (SystemExit, type(None))), f"uncaught {res.exception!r}"
    return res.exit_code, res.output, caught


def one_line_error(*args) -> str:
    """The CLI fails with exit code 1, one "Error:" line, no traceback and no numpy warning."""
    code, output, caught = run(*args)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "internal error" not in lines[0], lines[0]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    return lines[0]


def run_cli_bounded(*args, cwd: Path) -> str:
    """The CLI in a child process, killed after 20 s: a reader that waits on a FIFO fails the test
    instead of hanging the suite. Returns its one error line."""
    res = subprocess.run([sys.executable, "-m", "alexnet_pipe", *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=20, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), res.stdout + res.stderr
    return lines[0]


def write_npy(path: Path, shape: tuple[int, ...], data: bytes = b"", descr: str = "<f4") -> Path:
    """An .npy file whose header declares ``shape``, followed by ``data`` (whatever its length)."""
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(data)
    return path


def blobproto(dims: tuple[int, ...], legacy: bool, data: bytes = b"") -> bytes:
    """A BlobProto with ``dims`` as num/channels/height/width or as a BlobShape, and packed floats."""
    if legacy:
        fields = [pb.varint_field(n, d) for n, d in zip((1, 2, 3, 4), dims)]
    else:
        fields = [pb.bytes_field(7, b"".join(pb.varint_field(1, d) for d in dims))]
    return b"".join(fields) + (pb.bytes_field(5, data) if data else b"")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A converted dataset: 3 classes, 2 train and 1 val image each, with its mean_image.npy."""
    return tree_dataset(tmp_path_factory.mktemp("malformed"))


# ---------------------------------------------------------------- JSON nested past the parser's depth


@pytest.mark.parametrize("bomb", BOMBS, ids=list(BOMBS))
@pytest.mark.parametrize("last", [False, True], ids=["middle", "unterminated-last"])
def test_plot_names_the_line_nested_too_deeply(tmp_path, bomb, last):
    """A line nested 100,000 deep is one error naming file:line, like any other bad line (an
    unterminated last one too: it is no write in progress, the trainer writes flat rows)."""
    lines = [GOOD_ROW, BOMBS[bomb]] + ([] if last else [GOOD_ROW])
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + ("" if last else "\n"))
    line = one_line_error("plot", path, "-o", tmp_path / "x.png")
    assert f"{path}:2: JSON nested too deeply" in line and "fix or delete that line" in line
    assert not (tmp_path / "x.png").exists()


def test_resume_drops_a_line_nested_too_deeply(tmp_path):
    """The trainer's resume rewrites its metrics log: an unparsable deep line is dropped like a
    line cut short by a crash, the rows up to the checkpoint are kept."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5}]
    path.write_text("\n".join([json.dumps(rows[0]), BOMBS["arrays"], BOMBS["objects"], json.dumps(rows[1])]) + "\n")
    MetricsLog(path).start(resumed_epoch=1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        rows[0], {"event": "resumed", "after_epoch": 1, "after_step": 0}]


# ---------------------------------------------------------------- mean images with huge or empty shapes


HUGE_OR_EMPTY = {
    "1e6 x 1e6 x 3, no data": ((10**6, 10**6, 3), "declares shape (1000000, 1000000, 3)"),
    "2**62 x 0 x 3": ((1 << 62, 0, 3), "holds no values"),
    "0 x 4 x 3": ((0, 4, 3), "holds no values"),
    "3 x 0 x 5": ((3, 0, 5), "holds no values"),
}


@pytest.mark.parametrize("case", HUGE_OR_EMPTY, ids=list(HUGE_OR_EMPTY))
def test_inspect_mean_refuses_a_header_that_declares_a_huge_or_empty_shape(dataset, tmp_path, case):
    """The header is checked against the file's bytes before numpy allocates (np.load would try
    10.9 TiB for the first, and fail with numpy's own words for the second)."""
    shape, words = HUGE_OR_EMPTY[case]
    data = shutil.copytree(dataset, tmp_path / "data")
    write_npy(data / "mean_image.npy", shape)
    line = one_line_error("inspect", data, "--mean", "-o", tmp_path / "mean.png")
    assert str(data / "mean_image.npy") in line and words in line


@pytest.mark.parametrize("case", HUGE_OR_EMPTY, ids=list(HUGE_OR_EMPTY))
def test_update_mean_refuses_an_npy_mean_with_a_huge_or_empty_shape(tmp_path, case):
    shape, words = HUGE_OR_EMPTY[case]
    path = write_npy(tmp_path / "mean.npy", shape)
    line = one_line_error("update-mean", path)
    assert str(path) in line and words in line
    assert not (tmp_path / "mean.json").exists()


BLOBS = {
    "legacy 1 x 3 x 0 x 0": (blobproto((1, 3, 0, 0), legacy=True), "empty mean"),
    "shape 1 x 3 x 2**62 x 0": (blobproto((1, 3, 1 << 62, 0), legacy=False), "too large to be an array"),
    "shape 1 x 3 x 0 x 2**62": (blobproto((1, 3, 0, 1 << 62), legacy=False), "too large to be an array"),
    "shape 3 x 7 x 0": (blobproto((3, 7, 0), legacy=False), "empty mean"),
}


@pytest.mark.parametrize("case", BLOBS, ids=list(BLOBS))
def test_update_mean_refuses_an_empty_or_impossible_binaryproto(tmp_path, case):
    """No numpy text ("cannot reshape array of size 0 into shape ...") and no RuntimeWarning
    ("Mean of empty slice") before the error: one line that names the file."""
    blob, words = BLOBS[case]
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(blob)
    line = one_line_error("update-mean", path)
    assert str(path) in line and words in line


def test_update_mean_refuses_infinite_values_without_a_numpy_warning(tmp_path):
    """inf and -inf in one plane average to NaN: refused in one line, numpy's warning kept quiet."""
    image = np.full((2, 2, 3), 100.0, np.float32)
    image[0, 0, 0], image[0, 1, 0] = np.inf, -np.inf
    path = tmp_path / "mean.npy"
    np.save(path, image)
    line = one_line_error("update-mean", path)
    assert str(path) in line and "non-finite" in line


# ---------------------------------------------------------------- FIFOs and devices where a file is read


@pytest.fixture
def fifo(tmp_path):
    """Make a FIFO at a path (nothing ever writes to it: opening it for reading would wait forever)."""

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    return make


def test_update_mean_refuses_a_fifo_unopened(tmp_path, fifo):
    path = fifo(tmp_path / "mean.npy")
    line = run_cli_bounded("update-mean", path, cwd=tmp_path)
    assert str(path) in line and "FIFO (named pipe), not a regular file" in line


def test_update_mean_does_not_wait_on_a_fifo_where_mean_json_goes(tmp_path, fifo):
    """A FIFO named mean.json beside the input (where update-mean writes): refused, never read."""
    np.save(tmp_path / "mean.npy", np.full((4, 4, 3), 100.0, np.float32))
    fifo(tmp_path / "mean.json")
    line = run_cli_bounded("update-mean", tmp_path / "mean.npy", cwd=tmp_path)
    assert f"{tmp_path / 'mean.json'}: FIFO (named pipe), not a regular file" in line and "move it aside" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.json", "mean.npy"]


def test_inspect_mean_refuses_a_fifo_unopened(dataset, tmp_path, fifo):
    data = shutil.copytree(dataset, tmp_path / "data")
    (data / "mean_image.npy").unlink()
    fifo(data / "mean_image.npy")
    line = run_cli_bounded("inspect", data, "--mean", "-o", tmp_path / "mean.png", cwd=tmp_path)
    assert str(data / "mean_image.npy") in line and "not a regular file" in line


def test_plot_refuses_a_fifo_or_a_device_unopened(tmp_path, fifo):
    path = fifo(tmp_path / "metrics.jsonl")
    line = run_cli_bounded("plot", path, "-o", tmp_path / "x.png", cwd=tmp_path)
    assert "FIFO (named pipe), not a regular file" in line
    if os.path.exists("/dev/zero"):  # read whole, it would never end
        (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
        line = run_cli_bounded("plot", tmp_path / "zero.jsonl", "-o", tmp_path / "x.png", cwd=tmp_path)
        assert "device file, not a regular file" in line


@pytest.mark.parametrize("which", ["--list", "--list-val"])
def test_convert_refuses_a_fifo_as_a_list_file(tmp_path, fifo, which):
    raw = tmp_path / "raw"
    write_jpeg(raw / "cat" / "a.jpg", smooth_image(0, 40, 40))
    good = tmp_path / "good.txt"
    good.write_text("cat/a.jpg 0\n")
    path = fifo(tmp_path / "list.txt")
    lists = ["--list", path] if which == "--list" else ["--list", good, "--list-val", path]
    line = run_cli_bounded("convert", raw, tmp_path / "out", *lists, cwd=tmp_path)
    assert f"{which}: {path}: FIFO (named pipe), not a regular file" in line
    assert not (tmp_path / "out").exists()


def test_predict_names_a_device_or_fifo_in_a_folder_as_not_a_regular_file(tmp_path, fifo):
    """A link to /dev/zero found in a folder is "not a regular file", not "file too large (0 bytes
    ...)"; a FIFO there is never opened. The images beside them are predicted."""
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    top = tmp_path / "photos"
    write_jpeg(top / "a.jpg", smooth_image(1, 80, 80))
    (top / "zero.jpg").symlink_to("/dev/zero")
    fifo(top / "pipe.png")
    items, _ = expand_inputs([top])
    assert items == [(str(top / "a.jpg"), None), (str(top / "pipe.png"), "FIFO (named pipe), not a regular file: "
                                                 "not read"),
                     (str(top / "zero.jpg"), "device file, not a regular file: not read")]

    cfg = AlexNetConfig(num_classes=3, crop=67, arch="neon")
    model = build_model(cfg, generator=torch.Generator().manual_seed(0), init="kaiming")
    block = {"classes": ["n0", "n1", "n2"], "class_names": ["a", "b", "c"], "mean_rgb": [120.0, 110.0, 100.0],
             "std_rgb": None, "crop": 67, "short_side": 80, "channel_order": "RGB", "value_range": [0, 255]}
    checkpoint.save(tmp_path / "w.pt", {"kind": "weights", "model": model.state_dict(), "model_config": cfg.to_dict(),
                                        "data": block})
    # In this process: the reader opens with O_NONBLOCK, so even a regression cannot wait on the FIFO.
    res = CliRunner().invoke(main, ["predict", "-b", "cpu", "--json", "--model-file", str(tmp_path / "w.pt"), str(top)])
    answers = json.loads(res.stdout)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "top5" in answers[0]
    assert [a.get("error") for a in answers[1:]] == ["FIFO (named pipe), not a regular file: not read",
                                                     "device file, not a regular file: not read"]


# ---------------------------------------------------------------- heavier cases (make faults)


@pytest.mark.faults
@pytest.mark.parametrize("depth", [500, 900, 1000, 1100, 5000, 10_000_000])
def test_plot_and_resume_at_every_depth(tmp_path, depth):
    """Around the recursion limit and far past it (lines of 20 and 60 MB): plot reads the line (a
    list is refused, a dict without "epoch" passed over) or names it as nested too deeply; resume
    keeps the rows around it. Never a RecursionError."""
    for shape in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        path = tmp_path / "metrics.jsonl"
        path.write_text("\n".join([GOOD_ROW, shape, GOOD_ROW]) + "\n")
        code, output, _ = run("plot", path, "-o", tmp_path / "x.png")
        assert code == 0 or (code == 1 and output.startswith(f"Error: {path}:2: ")), output
        MetricsLog(path).start(resumed_epoch=1)
        kept = path.read_text().splitlines()
        assert [kept[0], kept[-2], json.loads(kept[-1])["event"]] == [GOOD_ROW, GOOD_ROW, "resumed"]



def _file_parameters() -> dict[tuple[str, str], click.Parameter]:
    """Every parameter of every command whose type is the CLI's EXISTING_FILE: (command, name) -> it."""
    from alexnet_pipe.cli.options import EXISTING_FILE

    found = {}
    for name, command in main.commands.items():
        for param in command.params:
            if param.type is EXISTING_FILE:
                found[(name, param.opts[0])] = param
    return found


def test_every_option_that_names_a_file_to_read_refuses_a_fifo_or_device_unopened(tmp_path, fifo):
    """The CLI's file type (every --synsets, --val-labels, --list, --model-file, --mean-file, import-weights'
    and plot's file) refuses what is not a regular file at parse time, before any reader opens it."""
    params = _file_parameters()
    assert {("convert", "--synsets"), ("convert", "--val-labels"), ("convert", "--list"), ("convert", "--list-val"),
            ("train", "--model-file"), ("test", "--model-file"), ("predict", "--model-file"), ("predict", "--synsets"),
            ("import-weights", "src"), ("import-weights", "--synsets"), ("import-weights", "--mean-file"),
            ("plot", "metrics")} <= set(params)
    pipe = fifo(tmp_path / "named.txt")
    targets = [(pipe, "FIFO (named pipe), not a regular file")]
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.txt").symlink_to("/dev/zero")
        targets.append((tmp_path / "zero.txt", "device file, not a regular file"))
    for (command, name), param in params.items():
        for path, why in targets:
            with pytest.raises(ConfigError) as refused:
                param.type.convert(str(path), param, None)
            shown_name = name if name.startswith("-") else name.upper()  # an argument: SRC, METRICS
            assert str(refused.value).startswith(f"{shown_name}: {path}: {why}"), (command, str(refused.value))
            assert str(refused.value).endswith("; give a regular file")


def test_the_cli_refuses_a_fifo_model_file_in_one_line_instead_of_waiting(tmp_path, fifo):
    """predict --model-file FIFO used to wait for a writer forever; import-weights' file, test's too."""
    image = write_jpeg(tmp_path / "a.jpg", smooth_image(0, 40, 40))
    pipe = fifo(tmp_path / "alexnet.p")
    line = run_cli_bounded("predict", "-b", "cpu", "--model-file", pipe, image, cwd=tmp_path)
    assert line == f"Error: --model-file: {pipe}: FIFO (named pipe), not a regular file: not read; give a regular file"
    line = run_cli_bounded("import-weights", pipe, "-o", tmp_path / "w.pt", cwd=tmp_path)
    assert line == f"Error: SRC: {pipe}: FIFO (named pipe), not a regular file: not read; give a regular file"
    assert not (tmp_path / "w.pt").exists()


# ---------------------------------------------------------------- convert's own records in OUT

DAMAGED_STATES = {"truncated": '{"tool": "alexnet-pipe convert", "settings": {', "a list": "[1, 2]",
                  "no settings": '{"tool": "alexnet-pipe convert", "plan": "sha256:00"}', "not UTF-8": b"\xff\xfe{",
                  **{f"nested {name}": bomb for name, bomb in BOMBS.items()}}


@pytest.mark.parametrize("case", DAMAGED_STATES, ids=list(DAMAGED_STATES))
def test_a_damaged_convert_state_is_named_and_force_starts_over(tmp_path, case):
    """A rerun into OUT whose state file is damaged used to be an "internal error" (JSONDecodeError,
    RecursionError, AttributeError): one line that says --force starts over, and --force does."""
    raw = tmp_path / "raw"
    for k in range(3):
        write_jpeg(raw / "train" / f"c{k % 2}" / f"{k}.jpg", smooth_image(k, 48, 40))
    out = tmp_path / "out"
    assert run("convert", raw, out, "--workers", "1", "--no-progress")[0] == 0
    state = out / ".convert.json"
    content = DAMAGED_STATES[case]
    state.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_line_error("convert", raw, out, "--workers", "1", "--no-progress")
    assert line.startswith(f"Error: {state} is damaged (") and "pass --force to discard them" in line, line
    code, output, _ = run("convert", raw, out, "--workers", "1", "--no-progress", "--dry-run")
    assert code == 1 and f"{state} is damaged" in output and "the run would stop (--force discards it)" in output
    code, output, _ = run("convert", raw, out, "--workers", "1", "--no-progress", "--force")
    assert code == 0, output
    assert run("convert", raw, out, "--workers", "1", "--no-progress")[0] == 0  # and the state is whole again


def test_a_nested_record_of_the_inputs_is_rewritten(tmp_path):
    """.convert-inputs.json nested past the parser's depth: a rerun rewrites it (was an internal error)."""
    raw = tmp_path / "raw"
    write_jpeg(raw / "train" / "c0" / "0.jpg", smooth_image(0, 48, 40))
    write_jpeg(raw / "train" / "c1" / "1.jpg", smooth_image(1, 48, 40))
    out = tmp_path / "out"
    assert run("convert", raw, out, "--workers", "1", "--no-progress")[0] == 0
    (out / ".convert-inputs.json").write_text(BOMBS["arrays"])
    code, output, _ = run("convert", raw, out, "--workers", "1", "--no-progress")
    assert code == 0, output
    assert json.loads((out / ".convert-inputs.json").read_text())["src"] == str(raw.resolve())


@pytest.mark.faults
@pytest.mark.parametrize("record", [".convert.json", ".convert-inputs.json"])
def test_seeded_mutations_of_converts_records_resume_or_give_one_line(tmp_path, record):
    """60 seeded mutations each of the state file and the record of the inputs: a rerun resumes (the
    mutation left the record's meaning whole, or the inputs record is rewritten) or refuses in one line,
    never an internal error."""
    from tests.helpers.mutation import mutate

    raw = tmp_path / "raw"
    for k in range(4):
        write_jpeg(raw / "train" / f"c{k % 2}" / f"{k}.jpg", smooth_image(k, 48, 40))
    out = tmp_path / "out"
    assert run("convert", raw, out, "--workers", "1", "--no-progress")[0] == 0
    pristine = (out / record).read_bytes()
    rng = random.Random(f"convert records {record}")
    outcomes = {0: 0, 1: 0}
    for _ in range(60):
        data, what = mutate(pristine, "mean.json", rng)  # the text mutations too: digits, tokens, lines
        (out / record).write_bytes(data)
        code, output, _ = run("convert", raw, out, "--workers", "1", "--no-progress")
        lines = [line for line in output.splitlines() if line.strip()]
        assert code in outcomes, (what, output)
        if code == 1:
            assert len(lines) == 1 and lines[0].startswith("Error: "), (what, output)
            assert "internal error" not in lines[0], (what, output)
        outcomes[code] += 1
        (out / record).write_bytes(pristine)
    print(record, "resumed:", outcomes[0], "refused in one line:", outcomes[1])
    assert outcomes[0] + outcomes[1] == 60


API_CALLS = {
    "convert --synsets": "alexnet_pipe.run_convert(alexnet_pipe.ConvertConfig(src=tmp / 'raw', dst=tmp / 'out', "
                         "synsets=fifo, workers=1, progress=False))",
    "convert --val-labels": "alexnet_pipe.run_convert(alexnet_pipe.ConvertConfig(src=tmp / 'raw', dst=tmp / 'out', "
                            "val_labels=fifo, workers=1, progress=False))",
    "predict --model-file": "alexnet_pipe.run_predict(alexnet_pipe.PredictConfig(model_file=fifo, "
                            "inputs=(tmp / 'raw',)))",
}


@pytest.mark.parametrize("call", API_CALLS, ids=list(API_CALLS))
def test_the_python_api_refuses_a_fifo_where_a_file_is_read(tmp_path, fifo, call):
    """The same check for callers of the Python API, whom the CLI's parse does not cover (in a child
    process killed after 20 s: a reader waiting on the FIFO fails the test instead of hanging it)."""
    write_jpeg(tmp_path / "raw" / "train" / "cat" / "a.jpg", smooth_image(0, 40, 40))
    write_jpeg(tmp_path / "raw" / "train" / "dog" / "b.jpg", smooth_image(1, 40, 40))
    path = fifo(tmp_path / "named.txt")
    code = ("import sys; from pathlib import Path; import alexnet_pipe; from alexnet_pipe.errors import ConfigError\n"
            f"tmp, fifo = Path({str(tmp_path)!r}), Path({str(path)!r})\n"
            f"try:\n    {API_CALLS[call]}\nexcept ConfigError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    option = call.split()[1]
    assert done.stdout.strip() == f"{option}: {path}: FIFO (named pipe), not a regular file: not read; give a " \
                                  "regular file", done.stdout + done.stderr
