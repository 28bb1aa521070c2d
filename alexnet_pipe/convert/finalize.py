"""The end of a conversion: the shards' completion records merged into the manifest, mean.json,
the mean image and each split's combined RecordIO index.

Every byte written here follows from OUT's completion records (and the scan), so finalizing
again (a --part run that ends just after another, or --repair) writes the same files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alexnet_pipe import __version__
from alexnet_pipe.config import ConvertConfig, ImageSettings
from alexnet_pipe.convert.plan import ShardPlan
from alexnet_pipe.dataset import parts
from alexnet_pipe.dataset.layout import (
    MANIFEST_FILE,
    MEAN_FILE,
    MEAN_IMAGE_BINARYPROTO,
    MEAN_IMAGE_NPY,
    STAGING_DIR,
    STATE_FILE,
    split_index_path,
)
from alexnet_pipe.dataset.mean import MeanImageSum, PixelStats, write_mean, write_mean_image
from alexnet_pipe.dataset.schema import (
    DATASET_FORMAT,
    DATASET_VERSION,
    ClassEntry,
    Manifest,
    MeanImage,
    Settings,
    ShardEntry,
    SplitEntry,
)
from alexnet_pipe.errors import SettingsMismatchError
from alexnet_pipe.formats import get_format
from alexnet_pipe.fsutil import atomic_write_json, read_json, remove
from alexnet_pipe.inputs.table import ScanResult


def _resize_policy(image: ImageSettings) -> dict:
    """The manifest's ``resize`` entry: the size rule in numbers and in words."""
    n = image.short_side
    if image.squash is not None:
        h, w = image.squash
        policy = {"squash": {"height": h, "width": w}, "short_side": n, "upscale": image.upscale,
                  "rule": f"squashed to exactly {w}x{h} (width x height), aspect ratio ignored, as Caffe's "
                          f"convert_imageset --resize_height {h} --resize_width {w}"}
        if image.resize_filter != ImageSettings.resize_filter:
            policy["filter"] = image.resize_filter
        return policy
    if n == 0:
        rule = "sizes kept"
    elif image.upscale:
        rule = f"scaled up or down so the short side is exactly {n}, aspect ratio kept, as im2rec --resize {n}"
    else:
        rule = f"scaled down so the short side is {n}; images whose short side is below {n} keep their size"
    policy = {"short_side": n, "upscale": image.upscale, "rule": rule}
    if image.resize_filter != ImageSettings.resize_filter:  # only then: a default manifest stays as it was
        policy["filter"] = image.resize_filter
    return policy


def _recorded_codecs(dst: Path) -> dict | None:
    """The codec versions OUT's state file records (what wrote every shard: a resume, --part or --repair
    with others is refused); None for a conversion begun before they were recorded."""
    try:
        codecs = read_json(dst / STATE_FILE).get("codecs")
    except (OSError, ValueError, AttributeError):
        return None
    return codecs if isinstance(codecs, dict) else None


def id_width(found: ScanResult) -> int:
    """Digits in a record's key (zero-padded): at least 8, more for a split that needs them."""
    return max(8, len(str(max(len(s) for s in found.splits.values()))))


def finalize(cfg: ConvertConfig, found: ScanResult, plans: dict[str, list[ShardPlan]]) -> Manifest:
    """Merge the shards' records into the manifest, mean.json and the mean image.

    Manifest fields about sizes, for readers that check crops:

    - ``resize``: ``{"short_side": N, "upscale": bool, "rule": "<the rule in words>"}``, and
      ``"filter"`` when not the default antialias (config.RESIZE_FILTERS); with ``--resize squash``
      also ``"squash": {"height": H, "width": W}`` (every image stored at exactly W x H).
    - ``splits[split]["short_side_counts"]``: ``{"<side>": images}`` for every stored short
      side below 512 pixels (a compact histogram: with upscaling on, only ``{"N": all}`` when
      N < 512); ``splits[split]["min_short_side"]``: the smallest stored short side (None when
      the split stored nothing). A training crop C needs padding for images with a short side
      below C: ``sum(n for side, n in counts.items() if int(side) < C)`` of them.
    - ``splits[split]["source_short_side_counts"]``: the same histogram of the inputs' original
      short sides (a 32x24 thumbnail counts at 24 however far it was scaled up), and
      ``upscaled_over_2x``: how many stored images were scaled up more than 2x (both absent when
      a shard was converted before they were recorded; ``--min-short-side N`` skips the smaller).
    - ``mean_image``: ``{"npy": ..., "binaryproto": ..., "size": S, "images": n}`` (None
      without training images); ``mean``: ``mean.json``, over the same pixels.
    """
    dst = cfg.dst
    splits, skipped, scan_skips = {}, [], Counter()
    for s in found.skipped:  # an entry may stand for many (inputs/listfile.py): the counts stay exact
        entry = {"split": s.split, "name": s.name, "reason": s.reason}
        skipped.append(entry | {"count": s.count} if s.count > 1 else entry)
        scan_skips[s.split] += s.count
    train_stats = PixelStats()
    train_mean = MeanImageSum(cfg.image.mean_size)
    for split, split_plans in plans.items():
        # One completion record at a time: memory stays flat however many shards there are.
        labels, short_sides, source_sides = Counter(), Counter(), Counter()
        records = passthrough = n_skipped = upscaled = 0
        sources_known = True  # every completion record knows its inputs' original sizes
        mins, shards = [], []
        for plan in split_plans:
            p = parts.load(dst, plan)
            if p is None:  # checked under the lock just before: a shard vanished meanwhile
                raise SettingsMismatchError(
                    f"shard {plan.name} of {dst} disappeared while finishing; rerun the command")
            labels.update({int(k): v for k, v in p.labels.items()})
            short_sides.update({int(k): v for k, v in p.short_side_counts.items()})
            if isinstance(p.source_short_side_counts, dict) and isinstance(p.upscaled_over_2x, int):
                source_sides.update({int(k): v for k, v in p.source_short_side_counts.items()})
                upscaled += p.upscaled_over_2x
            else:
                sources_known = False
            skipped.extend(p.skipped)
            records, passthrough, n_skipped = (records + p.records, passthrough + p.passthrough,
                                               n_skipped + len(p.skipped))
            if p.min_short_side is not None:
                mins.append(p.min_short_side)
            if split == "train":
                train_stats.merge(PixelStats.from_json(p.stats))
                if p.mean_sums:
                    sums = MeanImageSum.from_bytes((dst / p.mean_sums).read_bytes(), p.mean_sums)
                    train_mean.add(sums.sum, sums.count)
            if p.records > 0:  # an all-bad shard has no files
                shards.append(ShardEntry(name=p.name, records=p.records, first_id=p.first_id, lmdb=p.lmdb,
                                         recordio=p.recordio))
        entry = SplitEntry(
            records=records,
            # The one skip count: the scan's skips of this split (a junk folder, a missing listed
            # file) as well as the images that failed to convert, as the ``skipped`` list names them.
            inputs=len(found.splits[split]) + scan_skips[split],
            skipped=n_skipped + scan_skips[split],
            passthrough=passthrough,
            class_counts=tuple(labels.get(i, 0) for i in range(len(found.classes))),
            short_side_counts={str(k): v for k, v in sorted(short_sides.items())},
            min_short_side=min(mins) if mins else None,
            source_short_side_counts={str(k): v for k, v in sorted(source_sides.items())} if sources_known else None,
            upscaled_over_2x=upscaled if sources_known else None,
            layout=found.layout[split],
            shards=tuple(shards),
        )
        if shards:  # the files a format keeps per split (RecordIO's combined index)
            for fmt in cfg.formats:
                entry = get_format(fmt).finish_split(dst, split, entry)
        splits[split] = entry
    mean_image = None
    if train_stats.pixels:
        size = cfg.image.mean_size
        source = f"train split: centre {size}x{size} of every image ({_resize_policy(cfg.image)['rule']})"
        write_mean(dst / MEAN_FILE, train_stats.to_mean(source))
        mean_image = MeanImage.from_json(write_mean_image(dst, train_mean, train_stats.images))
    manifest = Manifest(
        format=DATASET_FORMAT,
        version=DATASET_VERSION,
        created_by=f"alexnet-pipe {__version__}",
        settings=Settings(cfg.settings()),
        resize=_resize_policy(cfg.image),
        codecs=_recorded_codecs(dst),
        classes=tuple(ClassEntry(index=i, id=c, name=found.class_names.get(c, ""), devkit_id=found.devkit_ids.get(c))
                      for i, c in enumerate(found.classes)),
        splits=splits,
        mean=MEAN_FILE if train_stats.pixels else None,
        mean_image=mean_image,
        record_id_width=id_width(found),
        skipped=tuple(skipped),
    )
    atomic_write_json(dst / MANIFEST_FILE, manifest.to_json())
    remove(dst / STAGING_DIR)
    return manifest


def finalized_files(dst: Path, plans: dict[str, list[ShardPlan]]) -> dict[str, bytes | None]:
    """The files ``finalize`` writes, as they are now (None: missing)."""
    rels = [MANIFEST_FILE, MEAN_FILE, MEAN_IMAGE_NPY, MEAN_IMAGE_BINARYPROTO]
    rels += [split_index_path(split) for split in plans]
    return {rel: read_or_none(dst / rel) for rel in rels}


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None
