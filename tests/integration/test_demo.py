"""The README's quick start: examples/demo.py (what scripts/demo.sh runs after the
install) mounts a demo source, reads it three times and unmounts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memcachefs import mounts

pytestmark = pytest.mark.fuse

DEMO = Path(__file__).parents[2] / "examples" / "demo.py"


def test_the_demo_with_its_defaults_mounts_reads_and_unmounts() -> None:
    # The default 1G: a capacity of 1.25 GiB, once passed on as a rounded "1.2G".
    command = [sys.executable, str(DEMO)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    capacity = re.search(r"--capacity (\d+)M\n", result.stdout)
    assert capacity is not None, result.stdout
    assert 1280 <= int(capacity.group(1)) <= 1282  # 1.25 x what it built (1 GiB + headers)
    assert "3rd read (kernel page cache)" in result.stdout
    mounted = [line for line in result.stdout.splitlines() if line.startswith("unmounted ")]
    assert len(mounted) == 1, result.stdout
    assert mounts.find_mount(Path(mounted[0].split(" ", 1)[1])) is None
