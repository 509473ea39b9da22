"""Mount memcachefs over temporary directories: for tests, benchmarks and examples.

The pytest plugin (``memcachefs.testing.plugin``, loaded automatically once
memcachefs is installed) wraps `mount` in fixtures; benchmarks call it directly.
"""

from memcachefs.testing.harness import MountedFS, fuse_available, mount

__all__ = ["MountedFS", "fuse_available", "mount"]
