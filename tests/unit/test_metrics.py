"""Every metric is declared once, and the README documents exactly those."""

from __future__ import annotations

import re
from pathlib import Path

from memcachefs.metrics import all_metrics, metric_names, statistics_classes

README = Path(__file__).resolve().parents[2] / "README.md"
# Keys of a snapshot that are facts about the mount, not counters or gauges.
STATIC_KEYS = {"mountpoint", "source", "block_size_bytes"}


def documented_keys() -> set[str]:
    """Backquoted names in the first column of the README's `| key | meaning |` tables."""
    keys: set[str] = set()
    in_table = False
    for line in README.read_text().splitlines():
        if line.startswith("| key | meaning |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            keys |= set(re.findall(r"`([a-z][a-z0-9_]*)`", line.split("|")[1]))
    return keys


def test_each_key_has_one_kind_and_a_help_text() -> None:
    metrics = all_metrics()  # raises if two components declare one key
    assert metrics
    for metric in metrics.values():
        assert metric.kind in ("counter", "gauge")
        assert metric.help and "\n" not in metric.help


def test_the_readme_documents_every_metric_and_no_other_key() -> None:
    documented = documented_keys()
    metrics = set(all_metrics())
    assert metrics - documented == set(), "metrics missing from the README's tables"
    assert documented & STATIC_KEYS == STATIC_KEYS - {"mountpoint", "source"}
    stray = documented - metrics - STATIC_KEYS
    assert stray == set(), "documented keys that no component counts"


def test_parts_partition_the_metrics() -> None:
    parts = statistics_classes()
    names = [metric_names(part) for part in parts]
    assert sum(len(n) for n in names) == len(set().union(*names))
