"""Saved prompt-prefix states, in memory (LRU within a byte budget) and optionally on disk.

Holds opaque byte strings (llama.cpp sequence states) under keys the engine derives from
everything that decides the bytes: the model file's hash, the llama.cpp build, the context
settings, the chat template and the prefix tokens. Knows nothing of llama.cpp itself.

Each state may name its owner (the user whose history the prefix shows), so that
`forget(owner)` can drop that user's states from memory and disk: a file is named
`<owner tag>-<key>.pfx`, the tag being a hash of the owner (no user id in a file name).
A disk file is `HEADER` (magic, format version, key, payload length, payload sha256) then
the payload. A file that is short, altered or holds another key raises `CacheFileError`
inside `get`, is deleted and counted as rejected, and the caller evaluates the prefix again;
its bytes never reach llama.cpp. Writes are atomic; the directory is kept under a size cap
by deleting the least recently used files.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from ._atomic import atomic_write_bytes
from .errors import CacheFileError, ConfigError

# About 24 MB of state per 1,000 prefix tokens for SmolLM2-135M (f16 KV, 30 layers); 256 MB
# holds the prefixes of an Ind-16/Pro-8 call (own + 8 neighbours) with room for more users.
DEFAULT_MEMORY_MB = 256.0
DEFAULT_DISK_MB = 2048.0

MAGIC = b"PGLPFX\x00\x01"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sI32sQ32s")  # magic, version, key, payload bytes, payload sha256
SUFFIX = ".pfx"


@dataclass
class CacheStats:
    """Counts since the cache was created (or, in a call's result, during that call)."""

    hits: int = 0  # prefixes restored instead of evaluated (memory or disk)
    disk_hits: int = 0  # of those, read from the directory
    misses: int = 0  # prefixes evaluated
    evicted: int = 0  # memory entries dropped to stay within the budget
    disk_rejected: int = 0  # files refused (truncated, corrupted, another key) and rebuilt
    disk_written: int = 0
    entries: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def cache_key(*parts: object) -> bytes:
    """A 32-byte key over the parts (strings, numbers, token tuples), unambiguous by length prefixes."""
    h = hashlib.sha256()
    for part in parts:
        raw = (struct.pack(f"<{len(part)}i", *part) if isinstance(part, tuple)
               else str(part).encode("utf-8"))
        h.update(struct.pack("<Q", len(raw)))
        h.update(raw)
    return h.digest()


def _mb(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 << 30:
        raise ConfigError(f"{name} must be a size in MB >= 0, got {value!r}")
    return float(value)


class PrefixCache:
    """Prefix states shared by every call of an engine; safe to use from several threads."""

    def __init__(self, memory_mb: float = DEFAULT_MEMORY_MB, directory: str | os.PathLike | None = None,
                 disk_mb: float = DEFAULT_DISK_MB):
        self.budget = int(_mb(memory_mb, "prefix_cache_mb") * (1 << 20))
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.disk_budget = int(_mb(disk_mb, "prefix_cache_disk_mb") * (1 << 20))
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"prefix_cache_dir={str(self.directory)!r} cannot be created ({exc}); "
                                  "name a writable directory or leave the disk cache off") from exc
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._owned: dict[str, set[bytes]] = {}  # owner -> keys of theirs held in memory
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.budget > 0 or self.directory is not None

    def get(self, key: bytes, owner: str = "") -> bytes | None:
        """The state saved under `key` (memory first, then a verified disk file), else None."""
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return data
        data = self._read_disk(key, owner)
        with self._lock:
            if data is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self.stats.disk_hits += 1
        self._remember(key, data, owner)
        return data

    def put(self, key: bytes, data: bytes, owner: str = "") -> None:
        """Keep `data` in memory (evicting the least recently used) and, when enabled, on disk."""
        self._remember(key, data, owner)
        if self.directory is not None and not self.path(key, owner).is_file():
            self._write_disk(key, data, owner)

    def owners(self) -> set[str]:
        """The owners of the states held in memory."""
        with self._lock:
            return {o for o, keys in self._owned.items() if keys & self._entries.keys()}

    def forget(self, owner: str) -> int:
        """Drop every state of `owner` from memory and disk; return how many were dropped."""
        if not owner:
            return 0
        dropped = 0
        with self._lock:
            for key in self._owned.pop(owner, set()):
                data = self._entries.pop(key, None)
                if data is not None:
                    self._bytes -= len(data)
                    dropped += 1
            self.stats.entries, self.stats.bytes = len(self._entries), self._bytes
        if self.directory is not None:
            for path in self.directory.glob(f"{owner_tag(owner)}-*{SUFFIX}"):
                try:
                    path.unlink()
                    dropped += 1
                except OSError:
                    pass
        return dropped

    def _remember(self, key: bytes, data: bytes, owner: str = "") -> None:
        if len(data) > self.budget:
            return  # larger than the whole budget: not kept in memory
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            while self._entries and self._bytes + len(data) > self.budget:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
                self.stats.evicted += 1
            self._entries[key] = data
            self._bytes += len(data)
            if owner:
                self._owned.setdefault(owner, set()).add(key)
            self.stats.entries, self.stats.bytes = len(self._entries), self._bytes

    def snapshot(self) -> CacheStats:
        with self._lock:
            self.stats.entries, self.stats.bytes = len(self._entries), self._bytes
            return CacheStats(**asdict(self.stats))

    def clear(self) -> None:
        """Forget the states held in memory (disk files stay)."""
        with self._lock:
            self._entries.clear()
            self._owned.clear()
            self._bytes = 0
            self.stats.entries = self.stats.bytes = 0

    # -- disk -----------------------------------------------------------------------------

    def path(self, key: bytes, owner: str = "") -> Path:
        assert self.directory is not None
        return self.directory / f"{owner_tag(owner)}-{key.hex()}{SUFFIX}"

    def _read_disk(self, key: bytes, owner: str = "") -> bytes | None:
        if self.directory is None:
            return None
        path = self.path(key, owner)
        try:
            blob = path.read_bytes()
        except OSError:  # absent, or unreadable: evaluate instead
            return None
        try:
            data = read_file_payload(blob, key)
        except CacheFileError:
            with self._lock:
                self.stats.disk_rejected += 1
            try:
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # recency for the size cap
        except OSError:
            pass
        return data

    def _write_disk(self, key: bytes, data: bytes, owner: str = "") -> None:
        if len(data) + HEADER.size > self.disk_budget:
            return
        header = HEADER.pack(MAGIC, FORMAT_VERSION, key, len(data), hashlib.sha256(data).digest())
        try:
            atomic_write_bytes(self.path(key, owner), header + data)
        except OSError:
            return  # a full or read-only disk costs the saving, not the call
        with self._lock:
            self.stats.disk_written += 1
        self._trim_disk()

    def _trim_disk(self) -> None:
        """Delete the least recently used files until the directory is within its cap."""
        files = []
        for p in self.directory.glob("*" + SUFFIX):  # type: ignore[union-attr]
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.disk_budget:
                break
            try:
                p.unlink()
                total -= size
            except OSError:
                pass


def owner_tag(owner: str) -> str:
    """A file-name tag for an owner: 16 hex digits of a hash ("_" for none); the id itself stays out."""
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()[:16] if owner else "_"


def read_file_payload(blob: bytes, key: bytes) -> bytes:
    """The payload of a cache file's bytes, after checking magic, version, key, length and checksum."""
    if len(blob) < HEADER.size:
        raise CacheFileError(f"prompt-cache file is truncated ({len(blob)} bytes, shorter than its header)")
    magic, version, file_key, size, digest = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CacheFileError("not a prompt-cache file (wrong magic)")
    if version != FORMAT_VERSION:
        raise CacheFileError(f"prompt-cache file format {version}, this build reads {FORMAT_VERSION}")
    if file_key != key:
        raise CacheFileError("prompt-cache file holds another key (model, template, prefix or llama.cpp build)")
    payload = blob[HEADER.size:]
    if len(payload) != size:
        raise CacheFileError(f"prompt-cache file is truncated or padded ({len(payload)} of {size} payload bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise CacheFileError("prompt-cache file is corrupted (payload checksum differs)")
    return payload


def describe_directory(directory: str | os.PathLike) -> dict:
    """Files, bytes and how many files have a sound header and length (payloads are checked on use)."""
    directory = Path(directory).expanduser()
    files = sound = total = 0
    for p in directory.glob("*" + SUFFIX) if directory.is_dir() else ():
        try:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(HEADER.size)
        except OSError:
            continue
        files += 1
        total += size
        if len(head) == HEADER.size:
            magic, version, _, n, _ = HEADER.unpack(head)
            sound += magic == MAGIC and version == FORMAT_VERSION and n + HEADER.size == size
    return {"dir": str(directory), "files": files, "mb": round(total / (1 << 20), 1), "sound_headers": sound}
