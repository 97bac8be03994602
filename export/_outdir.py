"""Export outputs that are directories: built beside the target, renamed into place on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from pgenrm_lite.errors import ExportError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def building_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh directory beside `out`; it becomes `out` on success and vanishes on failure."""
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(out, "tmp")
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fresh_sibling(out: Path, tag: str, *, create: bool = True) -> Path:
    """A hidden unused name beside `out` (mkdir honours the umask, unlike mkdtemp's 0700)."""
    while True:
        path = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.{tag}"
        if create:
            try:
                path.mkdir()
            except FileExistsError:
                continue
        elif path.exists():
            continue
        return path


def replace_dir(tmp: Path, out: Path) -> None:
    """Put `tmp` at `out`; an existing `out` is moved aside first and restored on failure."""
    old = None
    if out.exists():
        old = fresh_sibling(out, "old", create=False)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
