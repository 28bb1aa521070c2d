"""docs/ARCHITECTURE.md stays true: its module map lists every module of the package, names none that
is gone, and every module says what it owns in a docstring.

Modules are written in the document as paths relative to ``alexnet_pipe/`` in backquotes
(`convert.py`, `weights/caffe.py`); files elsewhere carry their folder (`tools/same_bytes.py`,
`tests/convert/test_convert.py`) and are not package modules. ``__init__.py`` and ``__main__.py`` need not
be listed (a package's ``__init__.py`` may be).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import alexnet_pipe

PACKAGE = Path(alexnet_pipe.__file__).parent
DOC = PACKAGE.parent / "docs" / "ARCHITECTURE.md"
# Files named in the document that live outside the package.
OUTSIDE = ("tools/", "tests/", "examples/", "docs/", "shared/", "alexnet_pipe/")
PY_NAME = re.compile(r"`([A-Za-z_][\w/]*\.py)`")


def package_modules() -> set[str]:
    """Every module file of the package, relative to it, but ``__init__.py`` and ``__main__.py``."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts}


def module_map(text: str) -> str:
    """The ``## Module map`` section of the document: up to the next ``## `` heading."""
    match = re.search(r"^## Module map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"{DOC} has no '## Module map' section"
    return match.group(1)


def named(text: str) -> set[str]:
    """The package modules a text names (backquoted ``*.py`` paths outside the folders above)."""
    return {name for name in PY_NAME.findall(text) if not name.startswith(OUTSIDE)}


def test_every_module_is_in_the_module_map():
    missing = sorted(package_modules() - named(module_map(DOC.read_text(encoding="utf-8"))))
    assert not missing, f"modules missing from the module map of {DOC.name}: {missing}"


def test_every_module_named_exists():
    gone = sorted(name for name in named(DOC.read_text(encoding="utf-8")) if not (PACKAGE / name).is_file())
    assert not gone, f"{DOC.name} names modules that do not exist under alexnet_pipe/: {gone}"


def test_each_module_is_listed_once():
    entries = re.findall(r"^- `([\w/]+\.py)`", module_map(DOC.read_text(encoding="utf-8")), re.M)
    twice = sorted({name for name in entries if entries.count(name) > 1})
    assert not twice, f"listed more than once in the module map of {DOC.name}: {twice}"


def package_dirs() -> set[str]:
    """Every subpackage of the package (a folder with an ``__init__.py``), relative to it, with a slash."""
    return {p.parent.relative_to(PACKAGE).as_posix() + "/" for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}


def test_every_package_has_a_section():
    """Each top-level subpackage heads a section of the module map (``### `inputs/`: ...``)."""
    headed = set(re.findall(r"^### `([\w/]+/)`", module_map(DOC.read_text(encoding="utf-8")), re.M))
    top = {name for name in package_dirs() if name.count("/") == 1}
    assert not top - headed, f"packages without a section in the module map of {DOC.name}: {sorted(top - headed)}"
    assert not headed - top, f"sections of {DOC.name} naming no package: {sorted(headed - top)}"


def test_every_module_has_a_docstring():
    bare = sorted(name for name in package_modules()
                  if ast.get_docstring(ast.parse((PACKAGE / name).read_text(encoding="utf-8"))) is None)
    assert not bare, f"modules without a docstring (first statement a string): {bare}"


def test_the_checks_see_the_package():
    """A broken glob or regex must not make the tests above pass vacuously."""
    modules = package_modules()
    assert {"convert/job.py", "loading/epoch_source.py", "inputs/table.py", "model/weights/caffe.py"} <= modules
    assert {"inputs/", "convert/", "model/weights/"} <= package_dirs()
    assert named("`convert.py`, `weights/neon.py`, `tools/same_bytes.py`") == {"convert.py", "weights/neon.py"}
