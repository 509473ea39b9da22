"""memcachefs: a read-only FUSE mirror of a slow directory, served from memory."""

__version__ = "0.1.0"
