"""Repair: find the damaged shards of a conversion and rewrite them from its raw inputs.

``alexnet-pipe convert RAW OUT --repair`` and ``alexnet-pipe verify OUT --repair`` (which reads
RAW from ``OUT/.convert-inputs.json``) re-check every finished shard against the checksum its
completion record holds (``shardcheck.check_finished``), in verify's checker processes, so a shard that kills
its reader is found too. The damaged shards are rewritten by convert's own path (staging, then
an atomic rename), each only if it comes out exactly as its completion record says; then the
manifest, mean and combined indices are written again. The result is byte-identical to a clean
run. Intact shards of a dataset converted before per-record checksums get them here.

This module finds the recorded inputs (``verify --repair``) and runs convert with --repair;
convert finds the damaged shards through shardcheck.py, so neither imports the other in a cycle.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from alexnet_pipe.config import ConvertConfig, ImageSettings, VerifyConfig
from alexnet_pipe.convert.job import ConvertResult, run_convert
from alexnet_pipe.dataset.layout import INPUTS_FILE, STATE_FILE
from alexnet_pipe.errors import DatasetError


def recorded_convert_config(cfg: VerifyConfig) -> ConvertConfig:
    """The --repair convert config of the conversion in ``cfg.root``, from its state and inputs records.

    Raises:
        DatasetError: the records are missing or damaged, or the raw inputs are gone (nothing changed).
    """
    root = cfg.root
    state_path, inputs_path = root / STATE_FILE, root / INPUTS_FILE
    if not state_path.is_file():
        raise DatasetError(f"{root} holds no record of its conversion ({STATE_FILE}): it was not written by "
                           "alexnet-pipe convert, or was copied without its hidden files; reconvert it")
    if not inputs_path.is_file():
        raise DatasetError(f"{root} does not record where its raw inputs are (converted by an older alexnet-pipe); "
                           f"rerun the alexnet-pipe convert command that made it with --repair added")
    try:
        settings = json.loads(state_path.read_text(encoding="utf-8"))["settings"]
        inputs = json.loads(inputs_path.read_text(encoding="utf-8"))
        paths = {k: None if inputs[k] is None else Path(inputs[k])
                 for k in ("src", "train_list", "val_list", "val_labels", "synsets")}
        image = ImageSettings(**{f.name: settings[f.name] for f in fields(ImageSettings) if f.name in settings})
        formats, shard_size, seed = tuple(settings["formats"]), settings["shard_size"], settings["seed"]
        val_ratio = settings.get("val_ratio")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise DatasetError(f"{root}'s records of its conversion ({STATE_FILE}, {INPUTS_FILE}) are damaged ({exc}); "
                           f"rerun the alexnet-pipe convert command that made it with --repair added") from exc
    src = paths["src"]
    if src is None or not src.is_dir():
        raise DatasetError(f"the raw inputs of {root} were in {src}, which is gone; nothing was changed: restore "
                           f"them there, or run alexnet-pipe convert RAW {root} --repair with the same options "
                           "and their new place")
    for key in ("train_list", "val_list", "val_labels", "synsets"):
        if paths[key] is not None and not paths[key].is_file():
            raise DatasetError(f"{root} was converted with {paths[key]}, which is gone; nothing was changed: "
                               "restore it, or run the alexnet-pipe convert command with --repair added")
    return ConvertConfig(src=src, dst=root, formats=formats, image=image, shard_size=shard_size,
                         workers=cfg.workers, seed=seed, progress=cfg.progress, val_labels=paths["val_labels"],
                         synsets=paths["synsets"], train_list=paths["train_list"], val_list=paths["val_list"],
                         val_ratio=val_ratio, repair=True)


def run_repair(cfg: VerifyConfig) -> ConvertResult:
    """``verify --repair``: rewrite the damaged shards of ``cfg.root`` from its recorded raw inputs.

    Raises:
        DatasetError: see ``recorded_convert_config``.
        SettingsMismatchError: the raw inputs changed since the conversion (nothing changed).
    """
    return run_convert(recorded_convert_config(cfg))
