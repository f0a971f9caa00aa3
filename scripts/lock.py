"""Write constraints.txt: the exact version of every package `pip install -e .[test]` pulled into .venv.

    .venv/bin/python scripts/lock.py          # after the suite passed with what is installed

It walks the requirements of era_compile[test] through the installed distributions (markers
evaluated for this machine), so the file lists what the package needs and nothing else the
environment happens to hold. torch is left out on purpose: scripts/setup.sh installs it first
(the local CPU build here, the image's own build on a GPU machine), and a pin would make pip
replace a GPU build.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
UNPINNED = {"torch", "era-compile"}


def closure(root: str, extras: tuple) -> dict:
    seen: dict = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in UNPINNED and key != root:  # torch and what it brings: installed by setup.sh
            continue
        first = key not in seen
        seen.setdefault(key, dist.version)
        for text in dist.requires or []:
            req = Requirement(text)
            markers = [{"extra": e} for e in wanted] + [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(m) for m in markers):
                continue
            if first or req.marker is not None:
                todo.append((req.name, tuple(req.extras)))
    return seen


def main() -> int:
    pins = closure("era-compile", ("test",))
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if name not in UNPINNED]
    header = (
        "# What the suite last passed with (written by scripts/lock.py; torch is pinned in scripts/setup.sh).\n"
        f"# Python {sys.version.split()[0]}, torch {metadata.version('torch')}\n"
    )
    (ROOT / "constraints.txt").write_text(header + "\n".join(lines) + "\n")
    print(f"wrote constraints.txt: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
