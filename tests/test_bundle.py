"""Bundles: built by `python -m export bundle`, verified before llama.cpp reads a byte."""

from __future__ import annotations

import shutil
import subprocess
import sys

import orjson
import pytest

from pgenrm_lite import BundleError, BundleIntegrityError, BundleVersionError, Scorer
from pgenrm_lite.bundle import MANIFEST, Bundle

from conftest import ALICE, PROMPT, REPO, A, B


@pytest.fixture(scope="module")
def bundle_dir(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "export", "bundle", "--gguf", str(tiny_gguf), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def copy(bundle_dir, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle_dir, dst)
    return dst


def _edit_manifest(root, fn):
    data = orjson.loads((root / MANIFEST).read_bytes())
    fn(data)
    (root / MANIFEST).write_bytes(orjson.dumps(data))


def test_manifest_describes_the_model(bundle_dir, tiny_gguf):
    b = Bundle.open(bundle_dir, verify="full")
    m = b.manifest
    assert m.schema_version == 1
    assert m.llm.architecture == "llama" and m.llm.context_length > 0 and m.llm.has_chat_template
    entry = next(f for f in m.files if f.path == m.llm.file)
    assert entry.size == tiny_gguf.stat().st_size and len(entry.sha256) == 64
    assert m.template["name"] == "pgenrm-default"
    assert m.embedder is None and m.prototypes is None


def test_scorer_from_bundle_scores(bundle_dir):
    with Scorer.from_bundle(bundle_dir, n_samples=1, max_tokens=400, analysis_chars=(10, 80),
                            n_threads=1) as scorer:
        res = scorer.compare(ALICE, PROMPT, A, B)
    assert res.n_parsed == 1


def test_existing_output_is_not_overwritten_without_force(bundle_dir, tiny_gguf):
    proc = subprocess.run([sys.executable, "-m", "export", "bundle", "--gguf", str(tiny_gguf), "--out",
                           str(bundle_dir)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "--force" in proc.stderr


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)


def test_unknown_schema_version_is_refused(copy):
    _edit_manifest(copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleVersionError, match="schema_version 99"):
        Scorer.from_bundle(copy)


def test_malformed_manifest(copy):
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(copy)
    (copy / MANIFEST).write_text('{"schema_version": 1, "files": "x"}')
    with pytest.raises(BundleError, match="malformed"):
        Bundle.open(copy)


def test_truncated_gguf_is_refused_by_size(copy):
    model = copy / "model.gguf"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleIntegrityError, match="truncated"):
        Scorer.from_bundle(copy)


def test_flipped_bytes_are_caught_by_full_verification(copy):
    model = copy / "model.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    Bundle.open(copy, verify="size")  # same size: only the hash can tell
    with pytest.raises(BundleIntegrityError, match="sha256"):
        Bundle.open(copy, verify="full")


def test_bad_gguf_header_is_refused(copy):
    model = copy / "model.gguf"
    data = bytearray(model.read_bytes())
    data[:4] = b"XXXX"
    model.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="header"):
        Bundle.open(copy, verify="size")


def test_missing_file(copy):
    (copy / "model.gguf").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        Bundle.open(copy)


@pytest.mark.parametrize("bad_path", ["../model.gguf", "/etc/passwd", "sub/../../x"])
def test_paths_escaping_the_bundle_are_refused(copy, bad_path):
    def escape(d):
        d["files"][0]["path"] = bad_path
        d["llm"]["file"] = bad_path
    _edit_manifest(copy, escape)
    with pytest.raises(BundleIntegrityError, match="escapes"):
        Bundle.open(copy)


def test_symlink_escaping_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.gguf"
    shutil.move(copy / "model.gguf", outside)
    (copy / "model.gguf").symlink_to(outside)
    with pytest.raises(BundleIntegrityError, match="outside"):
        Bundle.open(copy)


def test_unlisted_model_file_is_refused(copy):
    _edit_manifest(copy, lambda d: d.update(files=[]))
    with pytest.raises(BundleIntegrityError, match="does not list"):
        Bundle.open(copy)


def test_a_bundle_is_verified_without_loading_llama_cpp(default_bundle):
    import subprocess
    import sys

    code = ("import sys\nfrom pgenrm_lite.bundle import Bundle\nfrom pgenrm_lite.cli import main\n"
            f"Bundle.open({str(default_bundle)!r}, verify='full')\n"
            f"assert main(['verify', {str(default_bundle)!r}]) == 0\n"
            "print('llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
