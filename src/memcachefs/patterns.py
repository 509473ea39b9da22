"""Which files a `--warm` (or `--pin`) pattern names, relative to the mount's root.

The one matching rule, for every option that names files by pattern:

- A pattern without ``/`` matches a file *name* at any depth (``*.safetensors``).
- A pattern with ``/`` is anchored at the root (``models/sd/*.safetensors``);
  ``*``, ``?`` and ``[...]`` stay within one path component, and a ``**``
  component spans any number of directories (``models/**/*.bin``).
- A pattern that names a directory names every file below it (``models/sd``).

Only regular files are named; symbolic links are not followed.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class Match:
    relpath: bytes  # relative to the root, as the source names it
    size: int


def _has_magic(component: str) -> bool:
    return any(char in _MAGIC for char in component)


def _components(pattern: str) -> list[str]:
    return [part for part in pattern.strip("/").split("/") if part not in ("", ".")]


def _match_components(pattern: Sequence[str], path: Sequence[str]) -> bool:
    """Whether `path` (components) or a directory above it matches `pattern`."""
    if not pattern:
        return True  # the pattern named a directory above this path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_components(rest, path[skip:]) for skip in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], head) and _match_components(rest, path[1:])


def matches(relpath: bytes, patterns: Iterable[str]) -> bool:
    """Whether the file at `relpath` (relative to the root) is named by any pattern."""
    path = os.fsdecode(relpath).split("/")
    for pattern in patterns:
        if "/" not in pattern.strip("/"):
            # A name at any depth: the file's, or a directory's above it.
            if any(fnmatch.fnmatchcase(part, pattern.strip("/")) for part in path):
                return True
        elif _match_components(_components(pattern), path):
            return True
    return False


def _fixed_prefix(pattern: str) -> str:
    """The leading components without wildcards: the only directory worth walking."""
    if "/" not in pattern.strip("/"):
        return ""
    fixed = []
    for part in _components(pattern):
        if _has_magic(part) or part == "**":
            break
        fixed.append(part)
    return "/".join(fixed)


def expand(root: str | os.PathLike[str], patterns: Sequence[str]) -> dict[str, list[Match]]:
    """Every regular file under `root` each pattern names, in path order.

    Blocking (it walks the directory tree): run it in a worker thread.
    """
    found: dict[str, list[Match]] = {}
    for pattern in patterns:
        start = os.path.join(os.fsdecode(root), _fixed_prefix(pattern))
        hits: dict[bytes, Match] = {}
        for relpath, size in _walk(os.fsdecode(root), start):
            if matches(relpath, [pattern]):
                hits[relpath] = Match(relpath, size)
        found[pattern] = [hits[key] for key in sorted(hits)]
    return found


def _walk(root: str, start: str) -> Iterable[tuple[bytes, int]]:
    try:
        st = os.lstat(start)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        yield os.fsencode(os.path.relpath(start, root)), st.st_size
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for directory, _, names in os.walk(start):
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISREG(st.st_mode):
                yield os.fsencode(os.path.relpath(path, root)), st.st_size
