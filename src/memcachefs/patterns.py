"""File patterns of the source (``--pin``; the same rule for every option that names files).

The rule: a pattern is a glob relative to the source root, matched against a
file's relative path with ``/`` as separator. ``*`` and ``?`` never cross a
``/``; ``**/`` matches any number of directories (none included), so
``models/sd/*.safetensors`` names one directory's files and
``**/*.safetensors`` every such file in the tree. Only regular files match.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import trio

MAX_FILES = 100_000  # a bound on one expansion: a pattern naming more is an error


class TooManyFiles(ValueError):
    pass


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def matches(relpath: str, pattern: str) -> bool:
    """Whether the relative path `relpath` matches `pattern` (the rule above)."""
    return _compile(pattern.lstrip("/")).match(relpath) is not None


def _expand(source_root: Path, patterns: tuple[str, ...]) -> dict[str, list[tuple[str, int]]]:
    found: dict[str, list[tuple[str, int]]] = {pattern: [] for pattern in patterns}
    count = 0
    for directory, dirnames, filenames in os.walk(source_root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(directory, name)
            relpath = os.path.relpath(path, source_root).replace(os.sep, "/")
            hits = [pattern for pattern in patterns if matches(relpath, pattern)]
            if not hits:
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            count += 1
            if count > MAX_FILES:
                raise TooManyFiles(f"the patterns name more than {MAX_FILES} files")
            for pattern in hits:
                found[pattern].append((relpath, st.st_size))
    return found


def expand_by_pattern(
    source_root: Path, patterns: tuple[str, ...]
) -> dict[str, list[tuple[str, int]]]:
    """Per pattern, the (relpath, size) of the regular files it names (blocking)."""
    return _expand(source_root, patterns)


def expand(source_root: Path, patterns: tuple[str, ...]) -> list[tuple[str, int]]:
    """The (relpath, size) of the files any pattern names, sorted, each once (blocking)."""
    files: dict[str, int] = {}
    for hits in _expand(source_root, patterns).values():
        files.update(hits)
    return sorted(files.items())


async def expand_async(
    source_root: Path, patterns: tuple[str, ...]
) -> dict[str, list[tuple[str, int]]]:
    """`expand_by_pattern` in a worker thread (never on the trio thread)."""
    return await trio.to_thread.run_sync(expand_by_pattern, source_root, patterns)
