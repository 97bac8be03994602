"""Bounded input: files, `@FILE` arguments and standard input are read incrementally up to a
limit plus one byte, then refused with a typed error, so `/dev/zero` or a huge file cannot
exhaust memory, and a pipe with no writer ends instead of blocking forever.
"""

from __future__ import annotations

import os
import select
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

WAIT_S = 60.0  # how long a pipe may stay silent before we give up on it
_CHUNK = 1 << 16


def _read_fd(fd: int, limit: int, what: str, wait_s: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        except BlockingIOError:  # a pipe whose writer has not written yet (with no writer: end of file)
            ready, _, _ = select.select([fd], [], [], wait_s)
            if not ready:
                raise ConfigError(f"{what}: its writer sent nothing for {wait_s:.0f} s") from None
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ConfigError(f"{what} is larger than the limit of {limit:,} bytes; pass a smaller input")


def read_bytes(path: str | os.PathLike, limit: int, what: str, *, wait_s: float = WAIT_S) -> bytes:
    """The bytes of `path`, at most `limit` (a FIFO is opened without blocking on its writer)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a directory, not a file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise ConfigError(f"{what} {path} has {info.st_size:,} bytes, over the limit of {limit:,}")
        return _read_fd(fd, limit, f"{what} {path}", wait_s)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_stream(stream: BinaryIO, limit: int, what: str, *, wait_s: float = WAIT_S) -> bytes:
    """Up to `limit` bytes of an open binary stream (standard input)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. replaced in tests)
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise ConfigError(f"{what} is larger than the limit of {limit:,} bytes; pass a smaller input") from None
        return data
    return _read_fd(fd, limit, what, wait_s)


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} is not UTF-8 text: byte {data[exc.start]:#04x} at offset {exc.start} "
                          "cannot be decoded; convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


def open_nonblocking_writer(path: str | os.PathLike) -> BinaryIO:
    """Open a file for reading; a FIFO with no writer gives end-of-file instead of blocking the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
