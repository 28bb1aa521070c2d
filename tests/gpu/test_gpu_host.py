"""What tools/gpu_check.sh runs must import on the lent GPU host: its packages plus the offline bundle.

The host (tools/gpu_host_packages.txt, from the device notes) has torch, numpy, OpenCV, Pillow, ...,
but no DALI, lmdb or simplejpeg: those come from the bundle unpacked to /tmp/site. The project runs
there un-installed (`python3 -m alexnet_pipe`). Every module imported anywhere, at the top of a file
or inside a function, by the alexnet_pipe package and by the tools and tests the check runs (their
sibling imports followed) must come from the standard library of the host's Python (3.12), this
repository, the host's packages or the bundle. Read with ast: nothing is imported here.
The whole environment is rehearsed with `make gpu-rehearsal` (tools/gpu_rehearsal.sh).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIST = REPO / "tools" / "gpu_host_packages.txt"
LOCAL = ("alexnet_pipe", "tools", "tests")
# What gpu_check.sh runs: the package as `python -m alexnet_pipe`, these scripts, the GPU tests.
ENTRIES = ["tools/gpu_summary.py", "tools/dali_sweep.py", "tools/gpu_levers.py", "tools/make_shapes.py",
           "tests/gpu/test_gpu.py", "tests/conftest.py"]
# Gone from the standard library by 3.12, the host's Python (this may run on an older one).
NOT_IN_312 = {"distutils", "imp", "asynchat", "asyncore", "smtpd"}


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def read_list(path: Path = LIST) -> dict[str, dict[str, list[str]]]:
    """{section: {distribution (normalised): [import names]}} from the list file."""
    sections: dict[str, dict[str, list[str]]] = {}
    cur = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], {})
            continue
        assert cur is not None, f"{path}: {raw!r} before any [section]"
        dist, _, names = line.partition(":")
        dist = dist.strip()
        mods = names.split() if names.strip() else [dist.lower().replace("-", "_")]
        cur[_norm(dist)] = [] if mods == ["-"] else mods
    return sections


def allowed_modules(sections: dict[str, dict[str, list[str]]]) -> set[str]:
    return {m for sec in ("host", "bundle") for mods in sections.get(sec, {}).values() for m in mods}


def _imports_of(path: Path) -> list[tuple[str, int, Path]]:
    """(module, line, file) of every import in ``path``, anywhere in it; relative ones made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = path.relative_to(REPO).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, path) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from nvidia import dali`, `from tools import x`: the names may be modules themselves
            out.append((mod, node.lineno, path))
            out += [(f"{mod}.{a.name}", node.lineno, path) for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.args[0].value, node.lineno, path))
    return out


def _local_file(mod: str, importer: Path) -> Path | None:
    """The repository file ``mod`` names, seen from ``importer``: a package module, tests.x, tools.x,
    or a bare sibling of a script in tools/ (run as `python tools/x.py`, its folder is on sys.path)."""
    parts = mod.split(".")
    roots = [REPO]
    if importer.parent == REPO / "tools":
        roots.append(REPO / "tools")
    for root in roots:
        base = root.joinpath(*parts)
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def third_party_imports(entries: list[Path]) -> dict[str, list[str]]:
    """{module: ["file:line", ...]} for every import, in ``entries`` and every repository module they
    reach, that is neither the standard library nor this repository."""
    stdlib = set(sys.stdlib_module_names) - NOT_IN_312
    todo, seen = list(entries), set()
    found: dict[str, list[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for mod, line, where in _imports_of(path):
            if not mod:
                continue
            top = mod.split(".")[0]
            local = _local_file(mod, where)
            if local is not None:
                todo.append(local)
                continue
            if top in stdlib or top in LOCAL or (where.parent == REPO / "tools" and (REPO / "tools" / top).exists()):
                continue
            if "." in mod and _local_file(mod.rsplit(".", 1)[0], where) is not None:
                continue  # `from tools.x import name`: a name inside a repository module
            found.setdefault(mod, []).append(
                f"{where.relative_to(REPO) if where.is_relative_to(REPO) else where}:{line}")
    return found


def unresolved(found: dict[str, list[str]], allowed: set[str]) -> dict[str, list[str]]:
    """The modules of ``found`` that no allowed name covers (itself or a parent package)."""
    bad = {}
    for mod, where in found.items():
        parts = mod.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        if prefixes & allowed:
            continue
        # `from nvidia.dali import fn` also lists nvidia.dali.fn; `from torch import nn` lists torch.nn:
        # covered above. A bare namespace (`nvidia`, `google`) is covered when what follows it is.
        if any(a.startswith(mod + ".") for a in allowed) and any(m.startswith(mod + ".") for m in found):
            continue
        bad[mod] = where
    return bad


def _entries() -> list[Path]:
    files = sorted((REPO / "alexnet_pipe").rglob("*.py"))
    return files + [REPO / e for e in ENTRIES if (REPO / e).is_file()]


def test_every_import_of_what_the_gpu_check_runs_is_on_the_host_or_in_the_bundle():
    found = third_party_imports(_entries())
    assert "torch" in found and "nvidia.dali" in found and "lmdb" in found  # the scan sees them
    bad = unresolved(found, allowed_modules(read_list()))
    assert not bad, ("imported by what tools/gpu_check.sh runs, but neither on the GPU host nor in the "
                     f"offline bundle (import it lazily where optional, or carry it): {bad}")


def test_the_scan_follows_sibling_imports_and_catches_a_module_the_host_lacks(tmp_path, monkeypatch):
    # the checker itself, on files it has never seen: a script in tools/ importing a sibling, which
    # imports pyarrow2 inside a function, and a test helper reached through `from tests.x import`
    fake = tmp_path / "repo"
    (fake / "tools").mkdir(parents=True)
    (fake / "tests").mkdir()
    (fake / "tools" / "entry.py").write_text("import json\nimport helper\nfrom tests.util import f\nimport numpy\n")
    (fake / "tools" / "helper.py").write_text("def g():\n    import pyarrow2.compute as pc\n    return pc\n")
    (fake / "tests" / "__init__.py").write_text("")
    (fake / "tests" / "util.py").write_text(
        "import importlib\ndef f():\n    return importlib.import_module('yaml2')\nfrom nvidia import dali\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    found = third_party_imports([fake / "tools" / "entry.py"])
    assert set(found) == {"numpy", "pyarrow2.compute", "yaml2", "nvidia", "nvidia.dali"}
    assert found["pyarrow2.compute"] == ["tools/helper.py:2"]
    allowed = allowed_modules(read_list())
    assert set(unresolved(found, allowed)) == {"pyarrow2.compute", "yaml2"}
    # and the real list, with one line more, would let it through
    assert not unresolved(found, allowed | {"pyarrow2", "yaml2"})


def test_namespace_packages_need_their_own_part():
    allowed = allowed_modules(read_list())
    assert not unresolved({"nvidia.dali.plugin.pytorch": ["x"], "google.protobuf": ["x"]}, allowed)
    assert set(unresolved({"nvidia.cudf": ["x"], "google.cloud": ["x"], "distutils": ["x"]}, allowed)) == \
        {"nvidia.cudf", "google.cloud", "distutils"}


def test_the_list_holds_the_hosts_packages_and_the_bundle_and_what_the_bundle_needs():
    sec = read_list()
    host, bundle = sec["host"], sec["bundle"]
    assert len(host) > 150
    for dist in ("torch", "numpy", "opencv-python-headless", "pillow", "matplotlib", "scipy", "tqdm", "click",
                 "tensorboard", "pytest"):
        assert dist in host
    assert host["opencv-python-headless"] == ["cv2"] and host["pillow"] == ["PIL"] and host["pyyaml"][0] == "yaml"
    for dist in ("lmdb", "simplejpeg", "nvidia-dali-cuda130"):
        assert dist not in host and dist in bundle
    missing = [d for d in sec["bundle-needs"] if d not in host]
    assert not missing, f"the bundle needs these from the host, which lacks them: {missing}"


def test_the_bundle_script_packs_what_the_list_says():
    script = REPO.parent / "shared" / "reference" / "tools" / "dali-offline-bundle.sh"
    if not script.is_file():
        pytest.skip(f"{script} is not here")
    text = script.read_text()
    for dist in read_list()["bundle"]:
        assert re.search(rf"(?<![\w-]){re.escape(dist)}(?![\w-])", text, re.I), dist


def test_the_installed_distributions_agree_with_the_lists_import_names():
    # Where this venv has the package an import comes from, the list names that distribution.
    listed = {d for sec in ("host", "bundle") for d in read_list()[sec]}
    dists = md.packages_distributions()
    checked = 0
    for mod in third_party_imports(_entries()):
        top = mod.split(".")[0]
        if top in ("nvidia", "google", "cuda") or top not in dists or importlib.util.find_spec(top) is None:
            continue  # namespaces are shared; not installed here: nothing to compare
        names = {_norm(d) for d in dists[top]}
        # a full OpenCV build stands in for the headless one on a desktop; same module
        names |= {"opencv-python-headless"} if "opencv-python" in names else set()
        assert names & listed, f"{mod} comes from {sorted(names)} here, which the list does not name"
        checked += 1
    assert checked >= 5
