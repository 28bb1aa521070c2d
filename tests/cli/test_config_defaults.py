"""The configs own the defaults: `alexnet-pipe train -w DIR` builds the config that
`TrainConfig(data_dir=DIR)` is, on a CPU machine and on a GPU machine alike, and every other
command builds the config (or calls the job with the values) that the library's own defaults and
``config.resolve_*`` functions give; and the CLI turns only user errors into one line, while a
bug keeps its traceback (-v)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import pytest
import torch
from click.testing import CliRunner

from alexnet_pipe import cli
from alexnet_pipe.config import (
    DEFAULT_CROP,
    RUNS_DIR,
    ConvertConfig,
    TrainConfig,
    VerifyConfig,
    default_data_threads,
    default_read_workers,
    resolve_backend,
    resolve_datatype,
    run_save_path,
)
from alexnet_pipe.errors import ConfigError
from alexnet_pipe.train.distributed import launcher_placement

# The fields the CLI decides itself (cli.train_config says why): the progress bar follows the
# terminal, and a training run without -s saves to config.run_save_path().
CLI_ONLY = {"progress_bar", "save_path"}


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # torchrun's rank comes from the environment
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def root_log_level():
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def _cli_config(command, args: list[str]) -> TrainConfig:
    """The TrainConfig `alexnet-pipe <command> ARGS` runs with, parsed by click, nothing run."""
    with command.make_context(command.name, args) as ctx:
        return cli.train_config(ctx.params, test_only=command is cli.test_cmd)


def _differences(a: TrainConfig, b: TrainConfig) -> dict:
    return {f.name: (getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(TrainConfig)
            if f.name not in CLI_ONLY and getattr(a, f.name) != getattr(b, f.name)}


CASES = [
    ([], {}),
    (["-b", "cpu"], {"backend": "cpu"}),
    (["-b", "gpu"], {"backend": "gpu"}),
    (["-d", "f16"], {"datatype": "f16"}),
    (["--read-workers", "3"], {"read_workers": 3}),
    (["--data-threads", "2"], {"data_threads": 2}),
    (["-b", "cpu", "-d", "bf16", "--read-workers", "2"], {"backend": "cpu", "datatype": "bf16", "read_workers": 2}),
    (["--crop", "67", "--normalize-std"], {"crop": 67, "normalize_std": True}),
]


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
@pytest.mark.parametrize(("args", "kw"), CASES, ids=[" ".join(a) or "defaults" for a, _ in CASES])
def test_the_cli_builds_the_config_python_gets(tmp_path, monkeypatch, gpu, args, kw):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    from_cli = _cli_config(cli.train, ["-w", str(tmp_path), *args])
    from_python = TrainConfig(data_dir=tmp_path, **kw)
    assert _differences(from_cli, from_python) == {}
    assert from_cli.save_path is not None and from_cli.save_path.parts[0] == "alexnet-runs"
    assert from_python.save_path is None  # Python writes weights only where asked


def test_a_run_without_s_saves_where_run_save_path_says(tmp_path, monkeypatch):
    moment = time.localtime(1_700_000_000)
    monkeypatch.setattr(time, "localtime", lambda secs=None: moment)
    from_cli = _cli_config(cli.train, ["-w", str(tmp_path), "-b", "cpu"])
    assert from_cli.save_path == run_save_path() == RUNS_DIR / time.strftime("%Y%m%d-%H%M%S", moment) / "alexnet.pt"


# Options named otherwise than their TrainConfig field, and the CLI-only ones (no field).
_FIELD_OF = {"compile_model": "compile"}
_NOT_FIELDS = {"no_progress", "nproc", "verbose"}
# Fields whose "auto" the CLI writes None (no -b / -d given): config.resolve_* reads both alike.
_AUTO = {"backend", "datatype"}


@pytest.mark.parametrize("command", ["train", "test_cmd"])
def test_every_option_defaults_to_its_config_field(command):
    cmd = getattr(cli, command)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    with cmd.make_context(cmd.name, ["--help"], resilient_parsing=True) as ctx:
        for param in cmd.params:
            if param.name in _NOT_FIELDS or param.required:
                continue
            field = fields[_FIELD_OF.get(param.name, param.name)]
            want = None if field.name in _AUTO else field.default
            assert param.get_default(ctx) == want, (param.name, param.get_default(ctx), want)
    assert {resolve_backend(None), resolve_backend("auto")} == {resolve_backend(None)}
    assert TrainConfig.crop is None and TrainConfig(data_dir=".").crop == DEFAULT_CROP


def test_under_a_launcher_the_cli_takes_the_placement_config_gives(tmp_path, monkeypatch, root_log_level):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "LOCAL_", "CUDA_VISIBLE"))]:
        monkeypatch.delenv(key)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    from_cli = _cli_config(cli.train, ["-w", str(tmp_path), "-b", "cpu", "-i", "5"])
    placement = launcher_placement(os.environ)
    assert placement == {"rank": 1, "world_size": 2, "device_id": 1}
    assert {k: getattr(from_cli, k) for k in placement} == placement  # -i gives way to the launcher's GPU
    assert logging.getLogger().level == logging.ERROR  # one voice: rank 1 reports errors only


def test_checkpoints_keep_the_stored_names_of_rank_and_world_size(tmp_path):
    stored = TrainConfig(data_dir=tmp_path, backend="cpu", rank=1, world_size=3).to_dict()
    assert (stored["shard_id"], stored["num_shards"]) == (1, 3)
    assert "rank" not in stored and "world_size" not in stored
    assert stored["data_threads"] == default_data_threads()


# ---------------------------------------------------------------- the other commands


class _Called(Exception):
    """Raised by a stand-in for a job: the CLI got as far as calling it."""


def _capture(monkeypatch, module, name) -> dict:
    seen: dict = {}

    def stand_in(*args, **kw):
        seen["args"], seen["kw"] = args, kw
        raise _Called

    monkeypatch.setattr(module, name, stand_in)
    return seen


def _invoke(args):
    res = CliRunner().invoke(cli.main, ["-v", *args])  # -v: the stand-in's exception comes through as it is
    assert isinstance(res.exception, _Called), res.output


def test_convert_and_verify_build_the_configs_python_gets(tmp_path, monkeypatch, root_log_level):
    import alexnet_pipe.convert.dryrun
    import alexnet_pipe.convert.verify

    (tmp_path / "raw").mkdir()
    seen = _capture(monkeypatch, alexnet_pipe.convert.dryrun, "plan_convert")
    _invoke(["convert", str(tmp_path / "raw"), str(tmp_path / "out"), "--dry-run"])
    # progress_bar follows the terminal (CLI_ONLY): CliRunner's stderr is not one
    assert seen["args"] == (ConvertConfig(src=tmp_path / "raw", dst=tmp_path / "out", progress_bar=False),)
    seen = _capture(monkeypatch, alexnet_pipe.convert.verify, "run_verify")
    _invoke(["verify", str(tmp_path / "raw")])
    assert seen["args"] == (VerifyConfig(tmp_path / "raw", progress_bar=False),)
    _invoke(["verify", str(tmp_path / "raw"), "--workers", "3", "--quick"])
    assert seen["args"] == (VerifyConfig(tmp_path / "raw", workers=3, decode=False, progress_bar=False),)


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
def test_benchmark_predict_and_inspect_resolve_as_the_config_does(tmp_path, monkeypatch, gpu, root_log_level):
    import alexnet_pipe.apps.inspect
    import alexnet_pipe.apps.predict
    import alexnet_pipe.apps.step_timing
    from alexnet_pipe.apps.predict import PredictConfig
    from alexnet_pipe.apps.step_timing import BenchConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    backend = resolve_backend(None)
    seen = _capture(monkeypatch, alexnet_pipe.apps.step_timing, "check_device")
    _invoke(["benchmark"])
    assert seen["args"] == (BenchConfig(backend=backend, datatype=resolve_datatype(None, backend)),)

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    seen = _capture(monkeypatch, alexnet_pipe.apps.predict, "run_predict")
    _invoke(["predict", "--model-file", str(weights), str(tmp_path)])
    assert seen["args"] == (PredictConfig(model_file=weights, inputs=(tmp_path,), backend=backend),)

    seen = _capture(monkeypatch, alexnet_pipe.apps.inspect, "inspect_batch")
    _invoke(["inspect", str(tmp_path)])
    cfg = TrainConfig(data_dir=tmp_path)
    root, _out, split, _count, crop, seed, normalize_std, chosen, epoch = seen["args"]
    assert (crop, seed, normalize_std, chosen, epoch) == (cfg.crop, cfg.rng_seed, cfg.normalize_std, cfg.backend, 0)


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
def test_auto_resolves_by_the_machine(tmp_path, monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = TrainConfig(data_dir=tmp_path)
    backend = "gpu" if gpu else "cpu"
    assert (cfg.backend, cfg.datatype, cfg.read_workers) == (backend, "bf16" if gpu else "f32",
                                                             default_read_workers(backend))
    assert (cfg.crop, cfg.normalize_std, cfg.settings_from_weights) == (224, False, (True, True))
    assert cfg.epochs == cli.train.params[[p.name for p in cli.train.params].index("epochs")].default
    # What a checkpoint stores is concrete, and a replace keeps it (the CPU machine that resumes
    # a GPU run's checkpoint still reads backend gpu from it).
    stored = cfg.to_dict()
    assert "auto" not in (stored["backend"], stored["datatype"]) and stored["read_workers"] is not None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not gpu)
    assert dataclasses.replace(cfg, epochs=3).to_dict() == {**stored, "epochs": 3}


@pytest.mark.parametrize("gpu", [False, True], ids=["no-gpu", "gpu"])
def test_test_command_matches_a_test_only_config(tmp_path, monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    for args, kw in (([], {}), (["-b", "cpu", "-d", "f16", "--read-workers", "3"],
                                {"backend": "cpu", "datatype": "f16", "read_workers": 3})):
        from_cli = _cli_config(cli.test_cmd, ["-w", str(tmp_path), "--model-file", str(weights), *args])
        from_python = TrainConfig(data_dir=tmp_path, model_file=weights, test_only=True, **kw)
        assert _differences(from_cli, from_python) == {}
        assert from_cli.save_path is None  # testing writes no weights


def test_explicit_settings_are_not_taken_from_the_weights(tmp_path):
    cfg = TrainConfig(data_dir=tmp_path, crop=224)
    assert cfg.settings_from_weights == (False, True)
    with pytest.raises(ValueError, match="backend must be gpu, cpu or auto"):
        TrainConfig(data_dir=tmp_path, backend="tpu")


# ---------------------------------------------------------------- user errors and bugs


def _boom(*_a, **_k):
    raise ValueError("operands could not be broadcast together")  # what a numpy bug looks like


@pytest.fixture
def broken_info(monkeypatch, tmp_path):
    import alexnet_pipe.apps.info
    import alexnet_pipe.dataset.manifest

    monkeypatch.setattr(alexnet_pipe.dataset.manifest, "load_dataset", lambda root: object())
    monkeypatch.setattr(alexnet_pipe.apps.info, "dataset_summary", _boom)
    return tmp_path


def test_a_bug_is_not_passed_off_as_a_user_error(broken_info):
    res = CliRunner().invoke(cli.main, ["info", str(broken_info)])
    assert res.exit_code == 1
    [line] = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert "internal error" in line and "ValueError: operands could not be broadcast" in line and "-v" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_bug_keeps_its_traceback_with_v(broken_info, monkeypatch, where):
    if where == "before":
        args = ["-v", "info", str(broken_info)]
    else:  # info takes no -v of its own; verify does: break it the same way
        import alexnet_pipe.convert.verify

        monkeypatch.setattr(alexnet_pipe.convert.verify, "run_verify", _boom)
        args = ["verify", "-v", str(broken_info)]
    res = CliRunner().invoke(cli.main, args)
    assert isinstance(res.exception, ValueError) and not isinstance(res.exception, ConfigError), res.output
    assert "operands could not be broadcast" in str(res.exception)
    assert "Error:" not in res.output  # not the one-line user error: Python prints the traceback


def test_bad_settings_still_give_one_line(tmp_path):
    res = CliRunner().invoke(cli.main, ["train", "-w", str(tmp_path), "-b", "cpu", "--finetune"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    [line] = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert line == "Error: --finetune needs --model-file (the weights to start from)"
    res = CliRunner().invoke(cli.main, ["train", "-w", str(tmp_path), "-e", "0"])  # click's own check
    assert res.exit_code == 2 and "Traceback" not in res.output
    with pytest.raises(ConfigError):
        TrainConfig(data_dir=tmp_path, freeze="conv")
