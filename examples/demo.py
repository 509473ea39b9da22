"""Demo: mount memcachefs over a source of model-like files and read it twice.

    .venv/bin/python examples/demo.py [--size 1G] [--keep]

Builds a demo source (two .safetensors shards, config and tokenizer files) in a
temporary directory, mounts memcachefs over it, reads every file cold (from the
source), then again with the kernel page cache dropped (from memcachefs's
memory), then once more (from the kernel page cache), prints the throughput of
each pass and the cache statistics, and unmounts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memcachefs.config import GiB, MiB, format_size, parse_size

READ_CHUNK = 4 * MiB
BIN = Path(sys.executable).parent / "memcachefs"


def write_safetensors(path: Path, size: int) -> None:
    """A valid safetensors file: one JSON header, then raw float16 tensors."""
    tensor_bytes = 64 * MiB
    count = max(1, size // tensor_bytes)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i in range(count):
        rows = tensor_bytes // 2 // 4096
        header[f"layers.{i}.weight"] = {
            "dtype": "F16",
            "shape": [rows, 4096],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for _ in range(count):
            f.write(os.urandom(tensor_bytes))
        f.flush()
        os.fsync(f.fileno())


def build_source(root: Path, size: int) -> None:
    print(f"building a demo source of {format_size(size)} in {root}")
    write_safetensors(root / "model-00001-of-00002.safetensors", size // 2)
    write_safetensors(root / "model-00002-of-00002.safetensors", size // 2)
    (root / "config.json").write_text(json.dumps({"model_type": "demo", "hidden_size": 4096}))
    (root / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(5000)}}))


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget its cached pages of `path` (no global drop_caches)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(root: Path) -> tuple[int, float]:
    buffer = bytearray(READ_CHUNK)
    total, start = 0, time.perf_counter()
    for path in sorted(root.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total, time.perf_counter() - start


def report(label: str, total: int, seconds: float) -> None:
    print(
        f"  {label:<50} {format_size(total):>8} in {seconds:6.2f}s  "
        f"{total / seconds / GiB:6.2f} GiB/s"
    )


def memcachefs(*args: str) -> str:
    result = subprocess.run([str(BIN), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"demo: memcachefs {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="total size of the demo model (default 1G)")
    parser.add_argument("--keep", action="store_true", help="keep the demo directory")
    args = parser.parse_args()
    size = parse_size(args.size)

    workdir = Path(tempfile.mkdtemp(prefix="memcachefs-demo-"))
    source, mountpoint = workdir / "data-slow", workdir / "data-fast"
    source.mkdir()
    mountpoint.mkdir()
    mounted = False
    try:
        build_source(source, size)
        for path in source.iterdir():
            drop_page_cache(path)
        # What was built (whole 64 MiB tensors), with room to spare, in whole MiB: a
        # rounded display size ("1.2G" for 1.25 GiB) is not a byte count.
        built = sum(path.stat().st_size for path in source.iterdir())
        capacity = f"{-(-(built + built // 4) // MiB)}M"
        print(f"$ memcachefs mount {source} {mountpoint} --capacity {capacity}")
        print(
            "  " + memcachefs("mount", str(source), str(mountpoint), "--capacity", capacity).strip()
        )
        mounted = True
        print(f"reading every file of {mountpoint}:")
        report("1st read (cold: from the source)", *read_all(mountpoint))
        for path in mountpoint.iterdir():
            drop_page_cache(path)
        report("2nd read (memcachefs memory, page cache dropped)", *read_all(mountpoint))
        report("3rd read (kernel page cache)", *read_all(mountpoint))
        print(f"$ memcachefs stats {mountpoint}")
        print("  " + memcachefs("stats", str(mountpoint)).strip().replace("\n", "\n  "))
    finally:
        if mounted:
            memcachefs("umount", str(mountpoint))
            print(f"unmounted {mountpoint}")
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
