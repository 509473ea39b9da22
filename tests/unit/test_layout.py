"""The README's module table lists every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "memcachefs"
ENTRY_POINTS = {"__init__.py", "__main__.py"}


def _modules() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "testing":
            found.add("testing/")
        elif relative.name not in ENTRY_POINTS:
            found.add(relative.as_posix())
    return found


def _documented() -> set[str]:
    table = (ROOT / "README.md").read_text().split("| module | responsibility |", 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \|", table.split("\n\n", 1)[0], flags=re.M)
    return set(rows)


def test_readme_module_table_matches_the_package() -> None:
    assert _documented() == _modules()
