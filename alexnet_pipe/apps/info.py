"""The `info` job: a human summary of a converted dataset (pure formatting over the manifest)."""

from __future__ import annotations

from alexnet_pipe.dataset.layout import SHORT_SIDE_COUNTS_BELOW
from alexnet_pipe.dataset.manifest import Dataset
from alexnet_pipe.dataset.mean import eigen, load_dataset_mean
from alexnet_pipe.dataset.schema import copy_json
from alexnet_pipe.errors import AlexnetPipeError
from alexnet_pipe.formats import get_format
from alexnet_pipe.formats.lmdb import dir_size
from alexnet_pipe.text import plural, shown

# Text from the manifest is cut in the summary (the JSON keeps it whole): a class id or name to 100
# characters, a skipped input's path or reason to 500 (an edited manifest may hold megabytes).
_NAME_CHARS, _LINE_CHARS = 100, 500


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def dataset_summary(ds: Dataset) -> dict:
    """The facts `info` prints, as plain data (also what --json emits)."""
    m = ds.meta
    splits = {}
    for name, split in m.splits.items():
        shards = []
        for s in split.shards:
            size = 0
            for fmt in ds.formats:
                path = get_format(fmt).data_path(s.files(fmt))
                size += dir_size(ds.root / path) if (ds.root / path).exists() else 0
            shards.append({"name": s.name, "records": s.records, "bytes": size})
        splits[name] = {
            "records": split.records,
            "skipped": m.skipped_in(name),  # counted from the list: also right for older conversions
            "layout": split.layout,
            "source_short_side_counts": copy_json(split.source_short_side_counts),  # None: not recorded
            "upscaled_over_2x": split.upscaled_over_2x,
            "shards": shards,
            "bytes": sum(s["bytes"] for s in shards),
        }
    try:
        mean = load_dataset_mean(ds.root)
        mean_info = {"channel_order": mean.channel_order, "mean": mean.mean, "std": mean.std, "source": mean.source}
        cov = mean.rgb_covariance()
        if cov is not None:  # RGB, as the lighting augmentation uses it (absent: converted before it was recorded)
            values, vectors = eigen(cov)
            mean_info |= {"covariance_rgb": cov.tolist(), "eigenvalues": values, "eigenvectors": vectors}
    except AlexnetPipeError as exc:
        mean_info = {"error": str(exc)}
    mean_image = None
    if m.mean_image:
        files = [m.mean_image.npy, m.mean_image.binaryproto]
        mean_image = dict(m.mean_image.to_json(), files=[
            {"path": f, "bytes": (ds.root / f).stat().st_size if (ds.root / f).is_file() else None} for f in files
        ])
    return {
        "root": str(ds.root),
        "created_by": m.created_by,
        "version": ds.version,
        "upgrade": ds.upgrade_hint(),
        "classes": [c.to_json() for c in m.classes],
        "splits": splits,
        "mean": mean_info,
        "mean_image": mean_image,
        "settings": m.settings.to_json(),
        "codecs": copy_json(m.codecs),
        "skipped": [dict(copy_json(s), path=where) if isinstance(s, dict) else copy_json(s)
                    for s, (where, _) in zip(m.skipped, m.skipped_shown())],
    }


def _originals(split: dict) -> list[str]:
    """A line about the inputs' sizes before scaling (none for a conversion that did not record them)."""
    counts, upscaled = split.get("source_short_side_counts"), split.get("upscaled_over_2x")
    if not isinstance(counts, dict) or not isinstance(upscaled, int):
        return []
    sides = [int(k) for k in counts if str(k).isascii() and str(k).isdigit()]  # "²".isdigit(), but not int("²")
    smallest = f"{min(sides)} px" if sides else f"{SHORT_SIDE_COUNTS_BELOW} px or more"
    return [f"            originals: smallest short side {smallest}, {plural(upscaled, 'image')} scaled up more than "
            "2x (convert --min-short-side N skips small inputs)"]


def format_summary(info: dict, max_shards: int = 6, max_classes: int = 10, max_skipped: int = 10) -> str:
    """The summary `info` prints. Every line is shown escaped: ids, names, paths and reasons come from
    the manifest, and a control character in one (ESC[2J) must not reach the terminal as itself."""
    lines = [f"dataset   {info['root']}  ({info['created_by']}, format version {info['version']})"]
    if info.get("upgrade"):
        lines.append(f"upgrade   {info['upgrade']}")
    classes = info["classes"]
    listed = ", ".join(shown(c["id"], _NAME_CHARS) + (f" ({shown(c['name'], _NAME_CHARS)})" if c["name"] else "")
                       for c in classes[:max_classes])
    more = f", ... {len(classes) - max_classes} more" if len(classes) > max_classes else ""
    lines.append(f"classes   {len(classes)}: {listed}{more}")
    total = 0
    for name, split in info["splits"].items():
        total += split["bytes"]
        lines.append(
            f"{name:<9} {plural(split['records'], 'record')} in {plural(len(split['shards']), 'shard')}, "
            f"{_human(split['bytes'])}, "
            f"{split['skipped']} skipped  [{split['layout']}]"
        )
        for s in split["shards"][:max_shards]:
            lines.append(f"            {s['name']}  {plural(s['records'], 'record')}  {_human(s['bytes'])}")
        if len(split["shards"]) > max_shards:
            lines.append(f"            ... {plural(len(split['shards']) - max_shards, 'more shard', 'more shards')}")
        lines.extend(_originals(split))
    lines.append(f"on disk   {_human(total)}")
    mean = info["mean"]
    if "error" in mean:
        lines.append(f"mean      {mean['error']}")
    else:
        fmt = lambda v: "(" + ", ".join(f"{x:.2f}" for x in v) + ")"  # noqa: E731
        std = fmt(mean["std"]) if mean["std"] else "unknown"
        lines.append(f"mean      {mean['channel_order']} {fmt(mean['mean'])}  std {std}  [{mean['source']}]")
        if "covariance_rgb" in mean:
            lines.append("covar     RGB " + " ".join(fmt(row) for row in mean["covariance_rgb"]))
            lines.append("eigen     " + "  ".join(f"{value:.2f} x {fmt(vector)}" for value, vector
                                              in zip(mean["eigenvalues"], mean["eigenvectors"]))
                         + "  (PCA lighting, Krizhevsky et al. 2012)")
        else:
            lines.append("covar     not recorded (converted before it was; reconvert to record it)")
    image = info.get("mean_image")
    if image:
        files = ", ".join(f"{f['path']} ({'missing' if f['bytes'] is None else _human(f['bytes'])})"
                          for f in image["files"])
        over = plural(image["images"], "train image")
        lines.append(f"mean img  {image['size']}x{image['size']} over {over}: {files}")
    lines.append("settings  " + ", ".join(f"{k}={v}" for k, v in info["settings"].items()))
    codecs = info.get("codecs")
    if isinstance(codecs, dict):  # a conversion from before they were recorded says nothing
        lines.append("codecs    " + ", ".join(f"{k} {v}" for k, v in codecs.items())
                     + "  (a resume, --part or --repair needs these same versions)")
    for s in info["skipped"][:max_skipped]:
        lines.append(f"skipped   {shown(s.get('path'), _LINE_CHARS)}: {shown(s.get('reason'), _LINE_CHARS)}"
                     if isinstance(s, dict) else f"skipped   {shown(repr(s), _LINE_CHARS)}")
    if len(info["skipped"]) > max_skipped:
        lines.append(f"skipped   ... {len(info['skipped']) - max_skipped} more (info --json, or manifest.json, "
                     "lists them all)")
    return "\n".join(map(shown, lines))
