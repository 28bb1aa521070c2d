"""The layout of a converted dataset directory: every file and folder name it holds, defined once.

``alexnet-pipe convert RAW OUT`` writes::

    OUT/
      manifest.json            the dataset: splits, shards, checksums, labels (manifest.py); written last
      mean.json                the per-channel mean and std of the train split (mean.py)
      mean_image.npy           the train split's mean image; mean.binaryproto is its Caffe copy
      lmdb/<shard>/            one LMDB environment per shard (data.mdb)
      recordio/<shard>.rec     one RecordIO file per shard, with its index <shard>.idx
      recordio/<split>.idx     one combined index per split (DALI takes one index per reader)
      .convert.json            convert's bookkeeping, hidden: the conversion's identity,
      .convert-inputs.json     where the raw inputs were,
      .parts/                  the completion record of each shard,
      .staging/ .scan-cache/   shards being written, the archives' member lists,
      .convert.lock .finalize.lock  and the locks

Every module that reads or writes one of these names imports it from here; the path helpers
below build the per-shard and per-split names. Nothing here does I/O.
"""

from __future__ import annotations

import re

# --- What readers use: the manifest, the mean files and the shard folders ----------------------
MANIFEST_FILE = "manifest.json"  # the dataset's description; its presence marks a finished conversion
MEAN_FILE = "mean.json"  # per-channel mean (and std) of the train split
MEAN_IMAGE_NPY = "mean_image.npy"  # the train split's mean image, S x S x 3 RGB float32
MEAN_IMAGE_BINARYPROTO = "mean.binaryproto"  # the same mean image for Caffe (also an old format: see below)
LMDB_DIR = "lmdb"  # one LMDB environment per shard: lmdb/<shard>/
RECORDIO_DIR = "recordio"  # recordio/<shard>.rec + .idx per shard, recordio/<split>.idx per split

# --- The files LMDB itself keeps in a shard's folder ---------------------------------------------
LMDB_DATA_FILE = "data.mdb"
LMDB_LOCK_FILE = "lock.mdb"  # a reader's lock file; never part of the data

# --- Old mean formats: full mean images, refused where there is no mean.json beside them ------
OLD_MEAN_FILES = ("dataset_cache.pkl", MEAN_IMAGE_BINARYPROTO, "mean.npy")  # neon's, Caffe's, a plain .npy

# --- convert's bookkeeping (hidden): what a resumed, --part or --repair run relies on ----------
STATE_FILE = ".convert.json"  # the conversion's identity (settings and input digest): a rerun resumes only it
INPUTS_FILE = ".convert-inputs.json"  # where the raw inputs were: `verify --repair` rewrites shards from them
PARTS_DIR = ".parts"  # completion records: <shard>.json, <shard>.mean.npz, <shard>.<format>.crc
STAGING_DIR = ".staging"  # shards being written, renamed into place when complete
SCAN_CACHE = ".scan-cache"  # member lists of the archives (scan_cache.py); valid across settings, kept by --force
RUN_LOCK = ".convert.lock"  # held for the whole run: exclusive, or shared by --part runs
LOCK_FILE = ".finalize.lock"  # held while the manifest, mean and combined indices are written
MANAGED = (STATE_FILE, INPUTS_FILE, PARTS_DIR, STAGING_DIR, LMDB_DIR, RECORDIO_DIR, MANIFEST_FILE, MEAN_FILE,
           MEAN_IMAGE_NPY, MEAN_IMAGE_BINARYPROTO, LOCK_FILE)  # what --force removes (the scan cache stays)

# --- A manifest field's extent ----------------------------------------------------------------
SHORT_SIDE_COUNTS_BELOW = 512  # per-size counts of stored short sides below this go into the manifest


def shard_paths(name: str) -> dict[str, str]:
    """Paths of a shard's files relative to the dataset root."""
    return {
        "lmdb": f"{LMDB_DIR}/{name}",
        "rec": f"{RECORDIO_DIR}/{name}.rec",
        "idx": f"{RECORDIO_DIR}/{name}.idx",
    }


def split_index_path(split: str) -> str:
    """The combined RecordIO index of a split, relative to the dataset root."""
    return f"{RECORDIO_DIR}/{split}.idx"


def part_path(shard: str) -> str:
    """A shard's completion record, relative to the dataset root."""
    return f"{PARTS_DIR}/{shard}.json"


def mean_sums_path(shard: str) -> str:
    """A train shard's exact mean-image sums, relative to the dataset root."""
    return f"{PARTS_DIR}/{shard}.mean.npz"


def record_sums_path(shard: str, fmt: str) -> str | None:
    """Where a shard's per-record CRCs are kept, relative to the dataset root (None for a shard
    name that is not one convert writes, such as ``../x`` in an edited manifest: never followed)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", shard):
        return None
    return f"{PARTS_DIR}/{shard}.{fmt}.crc"
