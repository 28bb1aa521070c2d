"""List files users already have, as convert's input.

``convert RAW OUT --list train.txt [--list-val val.txt]`` converts the images the lists name.

Two formats, told apart by the first line that is not blank:
  * Caffe ``convert_imageset``'s list: ``<path> <label>`` per line. Like Caffe (which splits
    each line at its last space), the label is the last field and the path everything before
    it, so paths may hold spaces: ``n01/a b.jpg 3``.
  * MXNet ``im2rec``'s ``.lst``: ``<index>\\t<label>\\t<path>`` (tab separated, two tabs or
    more on the first line). The label may be written as a float (``3.000000``, as im2rec
    writes it) but must be a whole number; a line with several labels (a multi-label .lst) is
    refused, since a record here holds one class label. The index is checked, not used: the
    records are stored in the seeded shuffled order like every conversion.

Labels are taken as given: class k is label k. There are max label + 1 classes, over every line
listed (or as many as the synset file names), and a class without images is reported, not
renumbered: a missing file never shifts or drops a label. Class names come from ``--synsets``
(one class per line, line k names label k: ``n01440764 tench``), else a class is named by its
number.

Paths are relative to RAW (absolute ones must lie inside RAW). Listed paths that are missing,
lie outside RAW (``../x.jpg``), or are listed twice are skipped, with the list file and line in
the reason; the first ``MAX_SKIPPED_NAMED`` of a list one by one, the rest in one entry that counts
them by reason. A malformed line, or one longer than ``MAX_LINE_CHARS``, stops the scan with one
error naming ``file:line``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alexnet_pipe.dataset.schema import PATHS_UNDER_RAW
from alexnet_pipe.errors import LayoutError
from alexnet_pipe.inputs.devkit import is_archive, read_synsets
from alexnet_pipe.inputs.entries import not_a_file, some_names
from alexnet_pipe.inputs.table import ScanResult, Skip, SourceTableBuilder
from alexnet_pipe.text import plural

log = logging.getLogger(__name__)

CAFFE = "Caffe list"
IM2REC = "im2rec .lst"
# A label is a class index: one far beyond any real class count is a wrong column, not a class
# (and would make a class list of that length). ImageNet-21k has 21,841 classes.
MAX_CLASSES = 100_000
# A line holds one path, at most PATH_MAX (4,096 bytes) on Linux, and an index and a label: a longer
# line is not a list's. Read at most this much of it, so a 200 MB line costs 4 KB, not 1.7 GB.
MAX_LINE_CHARS = 4096 + 100
# Skipped entries of one list named one by one (in the manifest, and so in `info`); the rest are
# counted, by reason, in one entry. A list of an absent tree (1.28M missing files) made a 143 MB
# manifest and took 1.5 GB; a thousand is plenty to see what is wrong.
MAX_SKIPPED_NAMED = 1000
_QUOTED_CHARS = 100  # text of a line quoted in a message


@dataclass(frozen=True, slots=True)
class _Entry:
    line: int
    path: str  # as written in the list
    label: int


_NOT_A_LIST = "expected '<path> <label>' lines (Caffe) or '<index>\\t<label>\\t<path>' lines (im2rec .lst)"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, read as it streams (an ImageNet list is 1.28M lines)."""
    why = not_a_file(str(path))  # before open(): a FIFO would wait for a writer forever, a device never end
    if why is not None:
        raise LayoutError(f"could not read the list file {path} ({why}); pass the list as a regular file "
                          "(to filter one, write the result to a file first)")
    try:
        # surrogateescape: a path in another encoding still names its file on disk byte for byte.
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            for n in itertools.count(1):
                line = f.readline(MAX_LINE_CHARS + 1)  # never more: one line may be the whole file
                if not line:
                    return
                if len(line) > MAX_LINE_CHARS:  # MAX_LINE_CHARS + 1 without its newline: longer still
                    raise LayoutError(f"{path}:{n}: the line is longer than {MAX_LINE_CHARS:,} characters (it "
                                      f"starts {_quoted(line)}); a listed path is at most 4,096 bytes: is this "
                                      f"a list file? {_NOT_A_LIST}")
                if "\0" in line:
                    raise LayoutError(f"{path} is not a text list file (line {n} holds NUL bytes); {_NOT_A_LIST}")
                yield n, line
    except OSError as exc:
        raise LayoutError(f"could not read the list file {path} ({exc.strerror or exc})") from None


def _quoted(text: str) -> str:
    """Text of a line for a message: quoted and escaped (repr), at most ``_QUOTED_CHARS`` of it."""
    return repr(text[:_QUOTED_CHARS]) + ("..." if len(text) > _QUOTED_CHARS else "")


def _label(token: str, where: str, allow_float: bool) -> int:
    """A class index from ``token``: an integer (im2rec: or a whole float such as 3.000000)."""
    try:
        value = int(token)
    except ValueError:
        value = None
        if allow_float:
            try:
                as_float = float(token)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float.is_integer():
                value = int(as_float)
    if value is None:
        raise LayoutError(f"{where}: the label {_quoted(token)} is not a whole number; labels are class indices "
                          "0, 1, 2, ...")
    if value < 0:
        raise LayoutError(f"{where}: the label {value} is negative; labels are class indices 0, 1, 2, ...")
    if value >= MAX_CLASSES:
        raise LayoutError(f"{where}: the label {value} would make {value + 1} classes; labels are class indices "
                          f"0..K-1 (at most {MAX_CLASSES:,} classes): is this the label column?")
    return value


def _caffe_line(line: str, where: str) -> tuple[str, int]:
    parts = line.strip().rsplit(None, 1)
    if len(parts) != 2:
        raise LayoutError(f"{where}: expected '<path> <label>' (a Caffe list line), got {_quoted(line.strip())}")
    return parts[0], _label(parts[1], where, allow_float=False)


def _im2rec_line(line: str, where: str) -> tuple[str, int]:
    fields = [f.strip() for f in line.strip().split("\t")]  # as im2rec's read_list
    if len(fields) < 3:
        raise LayoutError(f"{where}: expected '<index>\\t<label>\\t<path>' (an im2rec .lst line, tab separated), "
                          f"got {_quoted(line.strip())}")
    if len(fields) > 3:
        raise LayoutError(f"{where}: {len(fields) - 2} labels on one line (a multi-label .lst); convert stores one "
                          "class label per image: write a .lst with one label column")
    try:
        int(fields[0])
    except ValueError:
        raise LayoutError(f"{where}: the index {_quoted(fields[0])} is not an integer; expected "
                          "'<index>\\t<label>\\t<path>' (an im2rec .lst line)") from None
    if not fields[2]:
        raise LayoutError(f"{where}: the path is empty")
    return fields[2], _label(fields[1], where, allow_float=True)


def read_list(path: Path) -> tuple[str, Iterator[_Entry]]:
    """Which format a Caffe list or an im2rec .lst is (CAFFE or IM2REC), and its entries, parsed
    as they are read.

    Raises:
        LayoutError: an empty list; while iterating, naming ``file:line`` of a malformed line.
    """
    lines = _lines(path)
    for n, first in lines:  # noqa: B007  n is used after the loop, by entries()
        if first.strip():
            break
    else:
        raise LayoutError(f"{path} lists no images; {_NOT_A_LIST}")
    kind = IM2REC if first.rstrip("\r\n").count("\t") >= 2 else CAFFE
    parse = _im2rec_line if kind == IM2REC else _caffe_line

    def entries() -> Iterator[_Entry]:
        for k, line in itertools.chain([(n, first)], lines):
            if line.strip():
                yield _Entry(k, *parse(line, f"{path}:{k}"))

    return kind, entries()


def _inside(roots: tuple[str, ...], listed: str) -> str | None:
    """The name of ``listed`` relative to RAW ('/'-separated), or None when it lies outside RAW.
    ``roots``: RAW as given (absolute) and, if it differs, its real path. Lexical (no symlink
    below RAW is followed): a tree that links to another disk is still the user's tree."""
    for root in roots:
        joined = os.path.normpath(os.path.join(root, listed))  # an absolute ``listed`` replaces root
        prefix = root if root.endswith(os.sep) else root + os.sep
        if joined.startswith(prefix):
            return joined[len(prefix):].replace(os.sep, "/")
        if joined == root:
            return "."
    return None


@dataclass
class _Split:
    names: dict[str, int]  # name relative to RAW -> label << 32 | line
    skipped: list[Skip]  # the first MAX_SKIPPED_NAMED, then one entry counting the rest
    skipped_count: int  # all of them
    labels: set[int]  # the labels of the files kept
    top: tuple[int, int]  # (the largest label listed, its line)


def _rest(split: str, list_path: Path, kinds: Counter, lines: tuple[int, int]) -> Skip:
    """The one entry for the skipped inputs of a list past the first MAX_SKIPPED_NAMED: how many, why."""
    n = sum(kinds.values())
    why = "; ".join(f"{kind}: {count:,}" for kind, count in kinds.most_common())
    return Skip(split, f"({n:,} more of {list_path.name})",
                f"{list_path.name} lines {lines[0]:,} to {lines[1]:,}: {why} (only the first "
                f"{MAX_SKIPPED_NAMED:,} skipped of a list are named)", count=n)


def _resolve(raw: str, list_path: Path, split: str, entries: Iterator[_Entry],
             taken: dict[str, int], taken_by: str = "") -> _Split:
    """The listed files that exist inside RAW, each once; the rest as skipped, with why.
    ``taken``: the names kept from the list ``taken_by`` (the train list), as _Split.names."""
    names: dict[str, int] = {}  # name -> label << 32 | line: one int an entry, not a tuple
    skipped, first, top, count = [], None, (-1, 0), 0
    rest, rest_lines = Counter(), [0, 0]  # past MAX_SKIPPED_NAMED: only counted, by kind, and their lines
    roots = (raw,) + ((os.path.realpath(raw),) if os.path.realpath(raw) != raw else ())
    for e in entries:
        count += 1
        first = first or e
        top = max(top, (e.label, e.line))
        name = _inside(roots, e.path)
        if name is None:
            kind = why = f"the path is outside RAW ({raw})"
        elif name in names:
            label, line = names[name] >> 32, names[name] & 0xFFFFFFFF
            other = "" if label == e.label else f" with label {e.label} (line {line} says {label})"
            kind, why = "listed again", f"listed again{other}; the first, line {line}, is kept"
        elif name in taken:
            kind, why = (f"also in {taken_by}",
                         f"also in {taken_by} (line {taken[name] & 0xFFFFFFFF}); an image is in one split only")
        elif not os.path.isfile(path := os.path.join(raw, name)):
            folder = os.path.isdir(path)
            kind = why = ("is a folder, not a file" if folder else "no such file") + " under RAW"
            if not folder and os.path.lexists(path):  # a FIFO, device, socket, broken link, link loop
                kind = why = not_a_file(path) or why
        else:
            names[name] = e.label << 32 | e.line
            continue
        if len(skipped) < MAX_SKIPPED_NAMED:
            skipped.append(Skip(split, e.path, f"{list_path.name} line {e.line}: {why}"))
        else:
            rest[kind] += 1
            rest_lines = [rest_lines[0] or e.line, e.line]
    if not names:
        why = skipped[0].reason.split(": ", 1)[1]
        hint = "; RAW must be the folder the listed paths are relative to" if "no such file" in why else ""
        raise LayoutError(f"none of the {plural(count, 'image')} listed in {list_path} can be converted (line "
                          f"{first.line}, {_quoted(first.path)}: {why}){hint}")
    # Every listed label counts for the class count, kept or not: a missing file must not shrink
    # the label space (and with it the model's output layer).
    n_skipped = len(skipped) + sum(rest.values())
    if rest:
        skipped.append(_rest(split, list_path, rest, tuple(rest_lines)))
    return _Split(names, skipped, n_skipped, {v >> 32 for v in names.values()}, top)


def _class_names(synsets: Path | None, n_labels: int, max_at: str) -> tuple[list[str], dict[str, str]]:
    """(class ids, id -> name): the synset file's, line k for label k; else "0", "1", ..."""
    if synsets is None:
        return [str(k) for k in range(n_labels)], {}
    if is_archive(synsets) or synsets.suffix == ".mat":
        raise LayoutError(f"with --list, --synsets takes a text file naming one class per line (line k names "
                          f"label k, e.g. Caffe's synset_words.txt), not {synsets.name}")
    wnids, names = read_synsets(synsets)
    if len(set(wnids)) != len(wnids):
        twice = sorted(w for w, n in Counter(wnids).items() if n > 1)
        raise LayoutError(f"{synsets} names a class on two lines ({some_names(twice)}); line k names label k")
    if n_labels > len(wnids):
        raise LayoutError(f"{max_at} has label {n_labels - 1}, but {synsets} names only {len(wnids)} classes "
                          f"(labels 0..{len(wnids) - 1}); is it this list's synset file?")
    return wnids, names


def scan_lists(raw: Path, train_list: Path, val_list: Path | None = None, synsets: Path | None = None) -> ScanResult:
    """The inputs named by list files (Caffe ``path label`` or im2rec ``.lst``), labels as given.

    Args:
        raw: the folder the listed paths are relative to.
        train_list: the training list; ``val_list`` the validation list, if any.
        synsets: class names, line k for label k (else a class is named by its number).
    Returns:
        A ScanResult whose splits are sorted by name (so a reordered list converts identically).
    Raises:
        LayoutError: a malformed line (naming file:line), no listed file found, or labels the
            synset file does not cover.
    """
    if not raw.is_dir():
        raise LayoutError(f"{raw} is not a directory")
    root = os.path.abspath(raw)
    lists = {"train": train_list} | ({"val": val_list} if val_list is not None else {})
    layout, splits = {}, {}
    for split, path in lists.items():
        kind, entries = read_list(path)
        fields = "index, label, path" if kind == IM2REC else "path label"
        layout[split] = f"{kind} {path.name} ({fields}), {PATHS_UNDER_RAW}"
        train = splits.get("train")
        splits[split] = _resolve(root, path, split, entries, train.names if train else {}, train_list.name)
    top, split = max((s.top, split) for split, s in splits.items())
    classes, class_names = _class_names(synsets, top[0] + 1, f"{lists[split]} line {top[1]}")
    result = ScanResult(layout, classes, class_names, {})
    for split, s in splits.items():
        table = SourceTableBuilder()
        for name in sorted(s.names):
            table.add(name, s.names[name] >> 32, root)
        result.splits[split] = table.build()
        result.skipped.extend(s.skipped)
        if s.skipped:
            first = s.skipped[0]
            named = ("lists them all" if s.skipped_count <= MAX_SKIPPED_NAMED
                     else f"names the first {MAX_SKIPPED_NAMED:,}, and counts the rest by reason")
            result.warnings.append(f"{lists[split].name}: {s.skipped_count:,} of {len(s.names) + s.skipped_count:,} "
                                   f"listed images are skipped, e.g. {_quoted(first.name)} ({first.reason}); "
                                   f"the manifest {named}")
    seen = set().union(*(s.labels for s in splits.values()))
    empty = [k for k in range(len(classes)) if k not in seen]
    if empty:
        shown = [f"{k} ({classes[k]})" if synsets is not None else str(k) for k in empty]
        result.warnings.append(f"{len(empty)} of {len(classes)} classes have no image in the lists "
                               f"(label{'s' if len(empty) > 1 else ''} {some_names(shown)}); they are kept, unused")
    for warning in result.warnings:
        log.warning("%s", warning)
    return result
