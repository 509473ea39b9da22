"""Configuration: the one definition of every option, parsed once into frozen objects.

Each field of the models below that users can set carries an `Option`: its
public name, help text and metavar. Everything else derives from that: the
``--name`` flag of `memcachefs mount`, the ``MEMCACHEFS_NAME`` environment
variable, the ``name`` key of a ``--config`` TOML file (dashes become
underscores), the error messages, and the README's option table (a test checks
it). Field names carry units (``capacity_bytes``, ``peer_timeout_s``); option
names do not (``--capacity 20G``).

Precedence: flags > environment > config file > defaults.

Sizes accept a plain byte count or a number with a K, M, G or T suffix. The
suffixes are 1024-based: ``4M`` is 4 MiB = 4194304 bytes. An optional trailing
``B`` or ``iB`` is accepted (``20GiB``), case is ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from memcachefs.errors import ConfigError
from memcachefs.keys import MAX_BLOCK_BYTES, MIN_BLOCK_BYTES

DEFAULT_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ENV_PREFIX = "MEMCACHEFS_"
MAX_SECRET_BYTES = 4096  # a cluster secret file larger than this is refused unread
MAX_FUSE_BACKGROUND = 4096  # the kernel takes up to 65535; each is a request in flight
KERNEL_MAX_BACKGROUND = 12  # FUSE's own limit for background requests

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SUFFIX_BYTES = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``20G`` / ``512M`` / ``4096`` into bytes (0 allowed); ConfigError otherwise."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(
            f"invalid {what} {text!r}: use a byte count or a number with K, M, G or T "
            "(1024-based), e.g. 20G"
        )
    number, suffix = match.group(1), match.group(2).lower()
    value = float(number) * _SUFFIX_BYTES[suffix]
    if value != int(value):
        raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


def format_size(num_bytes: float) -> str:
    for unit, factor in (("T", 1024 * GiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if abs(num_bytes) >= factor:
            return f"{num_bytes / factor:.1f}{unit}"
    return f"{int(num_bytes)}B"


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); the host must be an IP or a DNS name."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid {what} {text!r}: expected HOST:PORT")
    if not _is_host(host):
        raise ConfigError(f"invalid {what} {text!r}: {host!r} is not an IP address or host name")
    return host, int(port_text)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    labels = host.rstrip(".").split(".")
    return (
        len(host) <= 253
        and all(_HOST_LABEL_RE.match(label) for label in labels)
        and not labels[-1].isdigit()  # 256.1.1.1 is a bad IP, not a name
    )


def read_secret(path: Path) -> bytes:
    """The cluster secret: the file's bytes without surrounding whitespace.

    Its type, mode and size are checked before it is read, so a FIFO, a device
    or a huge file is refused at once instead of hanging or filling memory.
    """
    what = f"--cluster-secret-file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"{what}: {error.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} is not a regular file")
        if st.st_mode & 0o004:
            raise ConfigError(f"{what} is readable by everyone (chmod 600 it)")
        if st.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"{what} is larger than {MAX_SECRET_BYTES} bytes")
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    secret = data.strip()
    if not secret:
        raise ConfigError(f"{what} is empty")
    return secret


# -- the types values are given in ---------------------------------------------------------
def _size(value: object, info: pydantic.ValidationInfo) -> object:
    if isinstance(value, str):
        what = (info.field_name or "size").removesuffix("_bytes").replace("_", " ")
        try:
            return parse_size(value)
        except ConfigError as error:
            raise ValueError(f"invalid {what}: {_reason(error)}") from None
    return value


def _address(value: object) -> object:
    if isinstance(value, str):
        try:
            host, port = parse_host_port(value, "address")
        except ConfigError as error:
            raise ValueError(_reason(error)) from None
        if port == 0:
            raise ValueError("the port must be 1-65535")
        return host, port
    return value


def _reason(error: ConfigError) -> str:
    """'invalid size '20X': use ...' -> 'use ...' (the caller names the option and value)."""
    return str(error).split(": ", 1)[-1]


def _words(value: object) -> object:
    """A list given as one string (an environment variable): split on commas and spaces."""
    if isinstance(value, str):
        return [word for word in re.split(r"[,\s]+", value) if word]
    return value


Size = Annotated[int, BeforeValidator(_size)]
Address = Annotated[tuple[str, int], BeforeValidator(_address)]


@dataclass(frozen=True)
class Option:
    """How a field is set from outside (see the module docstring)."""

    name: str
    help: str
    metavar: str | None = None
    positional: bool = False
    negatable: bool = True  # a boolean's flag has a --no- form (off for a --no-X option)

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


_Frozen = ConfigDict(frozen=True, extra="forbid")


class CacheConfig(BaseModel):
    model_config = _Frozen

    capacity_bytes: Annotated[
        Size,
        Field(gt=0),
        Option(
            "capacity",
            "bytes of memory for cached blocks, e.g. 20G; the store never holds more",
            "SIZE",
        ),
    ]
    block_size_bytes: Annotated[
        Size,
        Field(ge=MIN_BLOCK_BYTES, le=MAX_BLOCK_BYTES),
        Option("block-size", "cache block size: the unit of a source read and of eviction", "SIZE"),
    ] = 4 * MiB
    read_ahead_blocks: Annotated[
        int,
        Field(ge=0, le=256),
        Option(
            "read-ahead",
            "blocks fetched in the background ahead of a sequential reader "
            "(capped at a quarter of the capacity)",
            "BLOCKS",
        ),
    ] = 4
    source_threads: Annotated[
        int,
        Field(ge=1, le=256),
        Option("source-threads", "parallel block reads from the source", "N"),
    ] = 8
    metadata_threads: Annotated[
        int,
        Field(ge=1, le=256),
        Option(
            "metadata-threads",
            "parallel metadata calls (stat, listings, xattrs) to the source",
            "N",
        ),
    ] = 8
    prefetch_patterns: Annotated[
        tuple[str, ...],
        BeforeValidator(_words),
        Option(
            "prefetch",
            "file name pattern of model files filled whole when opened (repeatable; the "
            "defaults cover *.safetensors *.gguf *.bin *.pt *.pth *.ckpt *.onnx)",
            "PATTERN",
        ),
    ] = DEFAULT_PATTERNS
    pin_patterns: Annotated[
        tuple[str, ...],
        BeforeValidator(_words),
        Option(
            "pin",
            "glob of files, relative to the source root (e.g. models/sd/*.safetensors, "
            "**/*.gguf), whose blocks stay out of LRU eviction; filled at mount (repeatable)",
            "PATTERN",
        ),
    ] = ()
    pin_share: Annotated[
        float,
        Field(gt=0, le=1),
        Option(
            "pin-share",
            "the largest share of the capacity pinned files may take; a larger pinned set "
            "is refused at start",
            "FRACTION",
        ),
    ] = 0.5
    no_prefetch: Annotated[
        bool, Option("no-prefetch", "do not prefetch model files when opened", negatable=False)
    ] = False
    prefetch_window_bytes: Annotated[
        Size,
        Field(gt=0),
        Option(
            "prefetch-window",
            "bytes of one file's prefetch in flight at once (about the source's latency x "
            "bandwidth)",
            "SIZE",
        ),
    ] = 64 * MiB
    metadata_cache_bytes: Annotated[
        Size,
        Field(ge=MiB),
        Option(
            "metadata-cache",
            "estimated bytes of memory for cached attributes, listings and xattrs "
            "(least recently used evicted first)",
            "SIZE",
        ),
    ] = 64 * MiB
    inode_limit: Annotated[
        int,
        Field(ge=100),
        Option(
            "inode-limit",
            "inodes the kernel may hold (the daemon keeps a record of each); past it the "
            "least recently looked-up names are dropped from the kernel's cache",
            "N",
        ),
    ] = 200_000
    metadata_timeout_s: Annotated[
        float,
        Field(gt=0),
        Option(
            "metadata-timeout",
            "how long an xattr or statfs request with no previous answer waits for a "
            "stalled source before it fails with EIO",
            "SECONDS",
        ),
    ] = 10.0
    warm_patterns: Annotated[
        tuple[str, ...],
        BeforeValidator(_words),
        Option(
            "warm",
            "load the files this pattern names (relative to the source root; see "
            "memcachefs.patterns) at start; readiness waits for them (repeatable)",
            "PATTERN",
        ),
    ] = ()
    push_page_cache: Annotated[
        bool,
        Option(
            "page-cache-push",
            "copy a file's cached blocks into the kernel page cache when it is opened "
            "(--no-page-cache-push: less CPU at open, less page cache)",
        ),
    ] = True

    @model_validator(mode="after")
    def _capacity_holds_a_block(self) -> CacheConfig:
        if self.capacity_bytes < self.block_size_bytes:
            raise ValueError(
                f"capacity {format_size(self.capacity_bytes)} is smaller than the block size "
                f"{format_size(self.block_size_bytes)}"
            )
        if self.block_size_bytes % 4096:
            raise ValueError("block size must be a multiple of 4K")
        return self


class ClusterConfig(BaseModel):
    """Peers that share their memory. Empty peer lists mean a cluster of one."""

    # A secret is any bytes (head -c 32 /dev/urandom): base64 in the JSON a background
    # daemon is handed, where a UTF-8 string would refuse it.
    model_config = ConfigDict(**_Frozen, ser_json_bytes="base64", val_json_bytes="base64")

    listen: Annotated[
        Address | None,
        Option(
            "listen",
            "serve blocks to peers on this address (needs --cluster-secret-file)",
            "HOST:PORT",
        ),
    ] = None
    peers: Annotated[
        tuple[Address, ...],
        BeforeValidator(_words),
        Option("peer", "a peer's --listen address (repeatable)", "HOST:PORT"),
    ] = ()
    peers_dns: Annotated[
        Address | None,
        Option(
            "peers-dns",
            "peers are every address of NAME, re-resolved every few seconds "
            "(a Kubernetes headless Service)",
            "NAME:PORT",
        ),
    ] = None
    peers_file: Annotated[
        Path | None,
        Option(
            "peers-file", "one HOST:PORT per line (# comments), re-read when it changes", "PATH"
        ),
    ] = None
    secret_file: Annotated[
        Path | None,
        Option(
            "cluster-secret-file",
            "the shared secret peer requests are authenticated with (not readable by others)",
            "PATH",
        ),
    ] = None
    secret: bytes | None = None  # read from secret_file at validation
    peer_timeout_s: Annotated[
        float,
        Field(gt=0),
        Option(
            "peer-timeout",
            "how long a block from a peer may take before the source is read instead",
            "SECONDS",
        ),
    ] = 5.0
    dns_refresh_s: Annotated[
        float,
        Field(gt=0),
        Option("dns-refresh", "how often --peer and --peers-dns names are resolved", "SECONDS"),
    ] = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.peers or self.peers_dns or self.peers_file)

    @model_validator(mode="before")
    @classmethod
    def _read_the_secret(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("secret_file") and data.get("secret") is None:
            try:
                data = {**data, "secret": read_secret(Path(data["secret_file"]))}
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return data

    @model_validator(mode="after")
    def _listener_needs_a_secret(self) -> ClusterConfig:
        if self.listen is not None and not self.secret:
            raise ValueError(
                f"--listen {self.listen[0]}:{self.listen[1]} needs --cluster-secret-file "
                "(peers must authenticate, on loopback too)"
            )
        if self.peers_file is not None:
            from memcachefs.membership import read_peers_file

            try:
                read_peers_file(self.peers_file)
            except OSError as error:
                raise ValueError(f"--peers-file {self.peers_file}: {error.strerror}") from None
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return self


class MountConfig(BaseModel):
    model_config = _Frozen

    source: Annotated[Path, Option("source", "the slow directory to mirror", positional=True)]
    mountpoint: Annotated[
        Path, Option("mountpoint", "an existing empty directory", positional=True)
    ]
    cache: CacheConfig
    cluster: ClusterConfig = ClusterConfig()
    attr_timeout_s: Annotated[
        float,
        Field(ge=0),
        Option(
            "attr-timeout",
            "how long attributes and listings are cached, by memcachefs and by the kernel",
            "SECONDS",
        ),
    ] = 1.0
    kernel_read_ahead_bytes: Annotated[
        Size,
        Field(ge=0, le=64 * MiB),
        Option(
            "kernel-read-ahead",
            "kernel readahead of the mount, which sets the size of FUSE reads; 0 keeps the "
            "kernel default (128K, about 2.5x slower). Needs root",
            "SIZE",
        ),
    ] = MiB
    fuse_max_background: Annotated[
        int,
        Field(ge=0, le=MAX_FUSE_BACKGROUND),
        Option(
            "fuse-max-background",
            "buffered READs the kernel sends the daemon at once (its limit for background "
            f"requests, set in fusectl); at the kernel default ({KERNEL_MAX_BACKGROUND}) READs "
            "waiting on a "
            "stalled source hold up reads of cached blocks. 0 keeps the kernel default. "
            "Needs root",
            "N",
        ),
    ] = 256
    allow_other: Annotated[
        bool,
        Option(
            "allow-other",
            "let other users use the mount (non-root users need user_allow_other in "
            "/etc/fuse.conf)",
        ),
    ] = False
    shutdown_grace_s: Annotated[
        float,
        Field(ge=0),
        Option(
            "shutdown-grace",
            "how long SIGTERM waits for reads in flight and open files before unmounting "
            "(keep it below your orchestrator's kill timeout)",
            "SECONDS",
        ),
    ] = 5.0
    log_file: Annotated[
        Path | None,
        Option(
            "log-file",
            "where the daemon logs (default: stderr in the foreground, "
            "/tmp/memcachefs-<mountpoint>.log in the background)",
            "PATH",
        ),
    ] = None
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        Option("log-level", "how much the daemon logs: debug, info, warning or error", "LEVEL"),
    ] = "info"
    log_format: Annotated[
        Literal["text", "json"],
        Option("log-format", "text, or json: one JSON object per line", "FORMAT"),
    ] = "text"

    ready_file: Annotated[
        Path | None,
        Option(
            "ready-file",
            "create this file once the mount serves and every --warm file is resident "
            "(removed at unmount)",
            "PATH",
        ),
    ] = None
    wait_warm: Annotated[
        bool,
        Option(
            "wait-warm",
            "without --foreground: return only once every --warm file is resident, "
            "showing the progress",
            negatable=False,
        ),
    ] = False
    http_address: Annotated[
        Address | None,
        Option(
            "http-address",
            "serve GET /metrics (Prometheus), /ready, /healthz and /stats on this address "
            "(no file data, no commands)",
            "HOST:PORT",
        ),
    ] = None

    @model_validator(mode="after")
    def _kernel_read_ahead_in_pages(self) -> MountConfig:
        if 0 < self.kernel_read_ahead_bytes < 4 * KiB:
            raise ValueError("--kernel-read-ahead: must be 0 (the kernel default) or at least 4K")
        return self

    def public_dump(self) -> dict[str, Any]:
        """The configuration as JSON-able data, without the secret itself."""
        return self.model_dump(mode="json", exclude={"cluster": {"secret"}})


# -- the option registry ----------------------------------------------------------------------
@dataclass(frozen=True)
class OptionField:
    """An option and where its value goes in MountConfig."""

    option: Option
    path: tuple[str, ...]  # field names from MountConfig down, e.g. ("cache", "capacity_bytes")
    field: FieldInfo

    @property
    def is_flag(self) -> bool:
        return self.field.annotation is bool

    @property
    def repeatable(self) -> bool:
        return str(self.field.annotation).startswith("tuple[")

    @property
    def default(self) -> Any:
        return None if self.field.is_required() else self.field.default


def _walk(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[OptionField]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk(annotation, (*path, name))
            continue
        for meta in field.metadata:
            if isinstance(meta, Option):
                yield OptionField(meta, (*path, name), field)


OPTIONS: dict[str, OptionField] = {entry.option.name: entry for entry in _walk(MountConfig)}
_BY_PATH = {entry.path: entry for entry in OPTIONS.values()}
_BY_KEY = {entry.option.key: entry for entry in OPTIONS.values()}


# -- building a MountConfig from flags, environment and a file -------------------------------
def load_config(
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
    defaults: Mapping[str, Any] | None = None,
    default_origins: Mapping[str, str] | None = None,
) -> MountConfig:
    """Merge the sources (flags > environment > file > `defaults` > defaults) and validate.

    `flags` maps option names to the values given on the command line (only the
    options given). `defaults` (option names too) is a layer below the file, e.g. an
    entry of a service spec, with its origins named in `default_origins`.
    ConfigError names the option and where its value came from.
    """
    origins: dict[str, str] = {}  # option name -> where its value came from
    values: dict[str, Any] = {}
    for name, value in (defaults or {}).items():
        values[name] = value
        origins[name] = (default_origins or {}).get(name, entry_flag(name))
    if config_file is not None:
        for key, value in read_config_file(config_file).items():
            name = _BY_KEY[key].option.name
            values[name], origins[name] = value, f"{key} in {config_file}"
    for name, entry in OPTIONS.items():
        if entry.option.env in environ:
            values[name], origins[name] = environ[entry.option.env], entry.option.env
    for name, value in flags.items():
        values[name], origins[name] = value, entry_flag(name)
    nested: dict[str, Any] = {"cache": {}, "cluster": {}}
    for name, value in values.items():
        *parents, leaf = OPTIONS[name].path
        target = nested
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    try:
        return MountConfig.model_validate(nested)
    except pydantic.ValidationError as error:
        raise ConfigError(describe_validation_error(error, origins, values)) from None


def entry_flag(name: str) -> str:
    entry = OPTIONS[name]
    return entry.option.name.upper() if entry.option.positional else entry.option.flag


def read_config_file(path: Path) -> dict[str, Any]:
    """The keys of a TOML config file; ConfigError on a bad file or an unknown key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: not valid TOML: {error}") from None
    for key in data:
        if key not in _BY_KEY:
            raise ConfigError(f"unknown key {key!r} in {path} (see memcachefs mount --help)")
    return data


def describe_validation_error(
    error: pydantic.ValidationError, origins: Mapping[str, str], values: Mapping[str, Any]
) -> str:
    """The first error of a validation, in one line naming the option, its origin and value."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    entry = None
    for length in range(len(loc), 0, -1):
        entry = _BY_PATH.get(loc[:length])
        if entry is not None:
            break
    if entry is None:
        return message
    name = entry.option.name
    where = origins.get(name, entry_flag(name))
    if first["type"] == "missing":
        return f"{where} is required"
    raw = values.get(name)
    rest = loc[len(entry.path) :]
    if isinstance(raw, list | tuple) and rest and rest[0].isdigit() and int(rest[0]) < len(raw):
        raw = raw[int(rest[0])]  # one value of a repeatable option
    given = f" {raw!r}" if isinstance(raw, str) else ""
    return f"{where}{given}: {message[0].lower()}{message[1:]}"
