"""Open and verify a bundle directory before any native library reads a byte of it.

A bundle is one directory: `manifest.json` (schema in `records.Manifest`) beside the GGUF
model, optionally the ONNX embedder and the prototype index. Loading checks that every
listed file stays inside the directory, exists and has the listed size, and that the GGUF
header is sane; `verify="full"` also checks every sha256.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import orjson

from ._atomic import atomic_write_bytes
from .errors import BundleError, BundleIntegrityError, BundleVersionError, RecordError
from .records import MANIFEST_SCHEMA_VERSION, Manifest, ManifestFile

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20

Verify = Literal["none", "size", "full"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> ManifestFile:
    rel = path.resolve().relative_to(root.resolve()).as_posix()
    return ManifestFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size)


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        return _inside(self.root, rel)

    @property
    def llm_path(self) -> Path:
        return self.path(self.manifest.llm.file)

    def chat_template(self) -> str | None:
        """The bundle's chat-template override (`llm.chat_template_file`), or None to use the GGUF's own."""
        rel = self.manifest.llm.chat_template_file
        if rel is None:
            return None
        try:
            return self.path(rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleIntegrityError(f"bundle chat template {rel} cannot be read as UTF-8 text ({exc}); "
                                       "rebuild the bundle") from exc

    @classmethod
    def open(cls, root: str | os.PathLike, *, verify: Verify = "size") -> "Bundle":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise BundleError(f"{root} is a file, not a bundle directory; pass the directory that holds "
                              "manifest.json")
        if not root.is_dir():
            raise BundleError(f"bundle directory {root} does not exist; build one with "
                              "`python -m export bundle` or `python -m export default-bundle`")
        manifest = read_manifest(root)
        bundle = cls(root=root, manifest=manifest)
        if verify != "none":
            bundle.verify(full=(verify == "full"))
        return bundle

    def verify(self, *, full: bool = True) -> None:
        """Raise `BundleIntegrityError` on the first file that is missing or differs from the manifest."""
        listed = {f.path for f in self.manifest.files}
        needed = [self.manifest.llm.file]
        if self.manifest.llm.chat_template_file:
            needed.append(self.manifest.llm.chat_template_file)
        if self.manifest.embedder:
            e = self.manifest.embedder
            needed += [f"{e.dir}/{e.model_file}", f"{e.dir}/{e.tokenizer_file}"]
        if self.manifest.prototypes:
            p = self.manifest.prototypes
            needed += [p.centroids_file, p.members_index_file, p.members_file, p.assignments_file]
        for rel in needed:
            if PurePosixPath(rel).as_posix() not in listed:
                raise BundleIntegrityError(f"{self.root}/{MANIFEST} names {rel!r} but does not list "
                                           "its size and sha256; rebuild the bundle")
        for entry in self.manifest.files:
            path = self.path(entry.path)
            if not path.is_file():
                raise BundleIntegrityError(f"bundle file {entry.path} is missing from {self.root}; "
                                           "restore it or rebuild the bundle")
            size = path.stat().st_size
            if size != entry.size:
                raise BundleIntegrityError(f"bundle file {entry.path} has {size} bytes but the manifest "
                                           f"says {entry.size}: it is truncated or replaced; rebuild the bundle")
            if full and sha256_file(path) != entry.sha256:
                raise BundleIntegrityError(f"bundle file {entry.path} does not match its sha256 in the "
                                           "manifest: it is corrupted or was modified; rebuild the bundle")
        if not model_file_ok(self.llm_path):
            raise BundleIntegrityError(f"{self.manifest.llm.file} is not a GGUF v2/v3 file (bad header)")


def _inside(root: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not rel or "\\" in rel:
        raise BundleIntegrityError(f"manifest path {rel!r} escapes the bundle directory; "
                                   "paths must be relative and inside the bundle")
    try:
        full = (root / Path(*p.parts)).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, symlink loop
        raise BundleIntegrityError(f"manifest path {rel[:200]!r} is not a usable file name ({exc})") from exc
    if not full.is_relative_to(root.resolve()):
        raise BundleIntegrityError(f"manifest path {rel!r} resolves outside the bundle (symlink?)")
    return full


def model_file_ok(path: Path) -> bool:
    """Cheap header check before llama.cpp parses a byte: GGUF magic and a known version."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[:4] == b"GGUF" and int.from_bytes(head[4:8], "little") in (2, 3)


def is_bundle_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a bundle (holds a manifest); `Bundle.open` does the real checks."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: it is not a pgenrm-lite bundle")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to read it")
    try:
        raw = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); rebuild the bundle") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{path} must hold a JSON object")
    version = raw.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise BundleVersionError(f"{path} has schema_version {version!r}; this runtime reads version "
                                 f"{MANIFEST_SCHEMA_VERSION}. Upgrade pgenrm-lite or rebuild the bundle")
    try:
        manifest = Manifest.validate_obj(raw)
    except RecordError as exc:
        raise BundleError(f"{path} is malformed: {exc}") from exc
    for entry in manifest.files:
        _inside(root, entry.path)
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_bytes(root / MANIFEST, orjson.dumps(manifest.model_dump(mode="json"),
                                                     option=orjson.OPT_INDENT_2))


def with_files(root: Path, manifest: Manifest, rel_paths: list[str]) -> Manifest:
    """The manifest with fresh size/sha256 entries for `rel_paths` (added or replaced)."""
    fresh = {rel: file_entry(root, _inside(root, rel)) for rel in rel_paths}
    kept = [f for f in manifest.files if f.path not in fresh]
    return manifest.model_copy(update={"files": kept + list(fresh.values())})
