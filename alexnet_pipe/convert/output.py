"""OUT's identity and its guards: which conversion a directory holds, whether a run may write it, and
the locks between runs.

``OUT/.convert-state.json`` records the settings and a digest of the input plan; a rerun resumes
only the very same conversion (``prepare_output``), and refuses anything else unless --force.
``OUT/.convert-inputs.json`` records where the raw inputs are, for ``verify --repair``. The run lock
keeps a second convert out of OUT (--part runs share it); the finish lock orders --part runs that
finish at the same time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alexnet_pipe.config import ConvertConfig
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.dataset.layout import (
    INPUTS_FILE,
    LMDB_DIR,
    MANAGED,
    PARTS_DIR,
    RECORDIO_DIR,
    RUN_LOCK,
    SCAN_CACHE,
    STAGING_DIR,
    STATE_FILE,
    shard_paths,
)
from alexnet_pipe.errors import SettingsMismatchError
from alexnet_pipe.fsutil import atomic_write_json, hold_lock, read_json, remove
from alexnet_pipe.imaging.codec_versions import codec_changes, codec_versions
from alexnet_pipe.inputs.table import ScanResult

log = logging.getLogger(__name__)


def _plan_digest(found: ScanResult) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(found.classes).encode())
    for split, sources in sorted(found.splits.items()):
        for name, label in zip(sources.names(), sources.labels.tolist()):
            h.update(f"{split}\0{name}\0{label}\n".encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


def output_identity(cfg: ConvertConfig, found: ScanResult) -> dict:
    """What OUT's state file records: a rerun resumes only a conversion with this same identity,
    codec versions included (they change the bytes written: imaging/codec_versions.py)."""
    return {"tool": "alexnet-pipe convert", "settings": cfg.settings(), "plan": _plan_digest(found),
            "codecs": codec_versions()}


def comparable_identity(recorded: dict, identity: dict) -> dict:
    """``identity`` as ``recorded`` can be compared with it: a conversion from before codec versions were
    recorded resumes whatever they are (nothing says which wrote it)."""
    return identity if "codecs" in recorded else {k: v for k, v in identity.items() if k != "codecs"}


def describe_mismatch(old: dict, new: dict) -> str:
    def shown(settings: dict, key: str) -> str:  # a setting left out of the record is its default
        return repr(settings[key]) if key in settings else "the default"

    old_settings = old.get("settings", {})
    diffs = [
        f"{k}: {shown(old_settings, k)} -> {shown(new['settings'], k)}"
        for k in sorted(set(old_settings) | set(new["settings"]))
        if old_settings.get(k) != new["settings"].get(k)
    ]
    if old.get("plan") != new["plan"]:
        diffs.append("the input files or their labels changed")
    if codecs := codec_changes(old.get("codecs"), new.get("codecs", {})):
        diffs.append(f"codec versions: {codecs}")
    return "; ".join(diffs) or "a different alexnet-pipe output version"


def check_output(dst: Path, force: bool, src: Path | None = None) -> None:
    """Before any work: OUT must be new, empty, or written by alexnet-pipe convert, and neither RAW
    (``src``) nor a folder holding it (--force would then write into, or clear, the inputs)."""
    if dst.exists() and not dst.is_dir():
        raise SettingsMismatchError(f"{dst} exists and is not a directory")
    if src is not None:
        out, raw = Path(os.path.realpath(dst)), Path(os.path.realpath(src))
        if out == raw or out in raw.parents:
            raise SettingsMismatchError(
                f"OUT {dst} {'is' if out == raw else 'holds'} RAW {src}: the converted data must go to a directory "
                "outside the inputs (a folder inside RAW is fine: it is never read as input)")
    # Ours even before the state file exists: the scan cache, and the state file being written by
    # a concurrent --part run into the same new directory.
    ours = (SCAN_CACHE, f".{STATE_FILE}.tmp-", RUN_LOCK)
    foreign = dst.is_dir() and not (dst / STATE_FILE).exists() and any(
        not e.name.startswith(ours) for e in dst.iterdir()
    )
    if foreign and not force:
        raise SettingsMismatchError(
            f"{dst} is not empty and was not written by alexnet-pipe convert; choose an empty or new "
            "directory, or pass --force to write into it anyway"
        )


def prepare_output(dst: Path, identity: dict, force: bool, repair: bool = False) -> None:
    """Create OUT or check it belongs to this exact conversion (refuse otherwise)."""
    state = dst / STATE_FILE
    if state.exists():
        try:
            old = read_identity(state)
        except (OSError, ValueError) as exc:
            if not force:
                raise SettingsMismatchError(
                    f"{damaged_state(state, exc)}, so nothing says which settings and inputs the shards in {dst} "
                    "were written with; pass --force to discard them and convert again, or choose another output "
                    "directory") from None
            old = {}  # matches no run: --force discards the conversion below
        same = comparable_identity(old, identity)
        _check_codecs(dst, old, same, force, repair)
        if repair and old != same:
            raise SettingsMismatchError(
                f"the inputs or settings are not those {dst} was converted from ({describe_mismatch(old, same)}); "
                "--repair rewrites shards only from the very same inputs, so nothing was changed: restore the "
                "inputs, or reconvert into a new directory")
        if old == same:
            for name in (PARTS_DIR, LMDB_DIR, RECORDIO_DIR):  # a user may have deleted one
                (dst / name).mkdir(exist_ok=True)
            return
        if not force:
            raise SettingsMismatchError(
                f"{dst} holds a conversion made with other settings or input ({describe_mismatch(old, same)}); "
                "rerun with the same settings to resume it, choose another output directory, "
                "or pass --force to discard it and start over"
            )
        log.warning("--force: discarding the earlier conversion in %s", dst)
        for name in MANAGED:
            remove(dst / name)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, identity)  # first: a concurrent --part run then sees OUT as ours
    for name in (PARTS_DIR, LMDB_DIR, RECORDIO_DIR):
        (dst / name).mkdir(exist_ok=True)


def read_identity(state: Path) -> dict:
    """The identity OUT's state file records. Raises OSError, or ValueError with the reason it is
    damaged (edited, a disk's error): then nothing says which conversion the finished shards belong to."""
    old = read_json(state)
    if not (isinstance(old, dict) and isinstance(old.get("settings"), dict) and isinstance(old.get("plan"), str)):
        raise ValueError("not a record of a conversion")
    return old


def damaged_state(state: Path, exc: Exception) -> str:
    return f"{state} is damaged ({' '.join(str(exc).split())[:200]})"


def _check_codecs(dst: Path, old: dict, identity: dict, force: bool, repair: bool) -> None:
    """Refuse, in one line, to add to OUT with codec versions other than those that wrote it (when all
    else is the same: other settings or inputs get describe_mismatch's line)."""
    codecs = codec_changes(old.get("codecs"), identity.get("codecs", {}))
    same_rest = {k: v for k, v in old.items() if k != "codecs"} == {k: v for k, v in identity.items() if k != "codecs"}
    if not codecs or not same_rest or (force and not repair):
        return
    recorded = ", ".join(f"{k} {v}" for k, v in sorted(old["codecs"].items()))
    if repair:
        raise SettingsMismatchError(
            f"{dst} was converted with other codec versions ({codecs}), so rewritten shards would not be "
            f"byte-identical; nothing was changed: repair with the recorded versions ({recorded}), or reconvert "
            "into a new directory")
    raise SettingsMismatchError(
        f"{dst} was converted with other codec versions ({codecs}), which write other bytes: convert with the "
        f"recorded versions ({recorded}) to resume it or add a --part, or start a new output with --force")


def clear_shard(dst: Path, plan: ShardPlan) -> None:
    """Remove what a crashed earlier attempt may have left of an unfinished shard."""
    for rel in shard_paths(plan.name).values():
        remove(dst / rel)
    remove(dst / STAGING_DIR / plan.name)


def inputs_record(cfg: ConvertConfig) -> dict:
    """Where this conversion reads its inputs (absolute paths): what `verify --repair` rewrites from."""
    def where(path: Path | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    return {"src": where(cfg.src), "train_list": where(cfg.train_list), "val_list": where(cfg.val_list),
            "val_labels": where(cfg.val_labels), "synsets": where(cfg.synsets)}


def record_inputs(cfg: ConvertConfig) -> None:
    """Keep OUT's record of its inputs current (a run from a moved RAW updates it)."""
    record, path = inputs_record(cfg), cfg.dst / INPUTS_FILE
    try:
        if read_json(path) == record:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, record)


def run_lock(dst: Path, shared: bool):
    """Refuse a second convert into OUT while one runs (--part runs share OUT by design)."""
    return hold_lock(dst / RUN_LOCK, f"another alexnet-pipe convert is writing {dst}; wait for it to finish, or "
                                     "stop it (a rerun resumes where it stopped)", shared)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX record lock: also honoured over NFS)."""
    with open(path, "a+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)
