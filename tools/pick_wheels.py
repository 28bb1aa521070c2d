#!/usr/bin/env python3
"""Print the pip arguments `make install` uses, chosen from the NVIDIA driver nvidia-smi reports.

    python tools/pick_wheels.py [--cuda auto|cpu|12|13] {explain,torch,dali,deps}

explain  one line: the driver found and the choice
torch    pip arguments for torch (CPU: torch==2.13.0 from PyPI; GPU: the CUDA 12 or 13 build)
dali     the DALI wheel: nvidia-dali-cuda120 (driver R525-R579) or nvidia-dali-cuda130 (R580+, or CPU)
deps     for the CUDA 12 choice, the project's dependencies with nvidia-dali-cuda120 in place of
         nvidia-dali-cuda130 (install them, then the project with --no-deps); empty otherwise,
         meaning `pip install -e ".[test]"` as is
--cuda forces the choice (`make install CUDA=12`); auto reads `nvidia-smi`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from alexnet_pipe.loading.wheels import Choice, choose, detect_driver  # noqa: E402


def project_deps(pyproject: str, dali: str, extras: tuple[str, ...] = ("test",)) -> list[str]:
    """The dependencies (and ``extras``) listed in pyproject.toml, with ``dali`` as the DALI wheel."""
    try:
        import tomllib

        data = tomllib.loads(pyproject)["project"]
        deps = list(data["dependencies"])
        for extra in extras:
            deps += data.get("optional-dependencies", {}).get(extra, [])
    except ModuleNotFoundError:  # Python 3.10: read the two lists by hand
        def block(name: str) -> list[str]:
            m = re.search(rf"^{name}\s*=\s*\[(.*?)\]", pyproject, re.M | re.S)
            return re.findall(r'"([^"]+)"', m.group(1)) if m else []
        deps = block("dependencies") + [d for e in extras for d in block(e)]
    return [re.sub(r"^nvidia-dali-cuda\d+", dali, d) for d in deps]


def answer(what: str, choice: Choice, pyproject: str) -> str:
    if what == "explain":
        return choice.why
    if what == "torch":
        return " ".join(choice.torch)
    if what == "dali":
        return choice.dali
    if choice.dali == "nvidia-dali-cuda130":
        return ""
    return " ".join(project_deps(pyproject, choice.dali))  # no spaces inside: the Makefile splits on them


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["explain", "torch", "dali", "deps"])
    ap.add_argument("--cuda", default="auto", help="auto (read nvidia-smi), cpu, 12 or 13")
    args = ap.parse_args(argv)
    try:
        choice = choose(detect_driver(), args.cuda)
    except ValueError as exc:
        print(f"pick_wheels: {exc}", file=sys.stderr)
        return 2
    print(answer(args.what, choice, (REPO / "pyproject.toml").read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
