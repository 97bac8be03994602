"""The ONNX sentence embedder: export (export/onnx_embedder.py) and run time (pgenrm_lite/embedder.py).

Parity is against a sentence-transformers-style reference computed here with torch:
transformers AutoModel on the same local folder, mean pooling over the attention mask,
L2 normalisation. The exports are built once per module.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import orjson
import pytest

from conftest import REPO, require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
require(all(importlib.util.find_spec(m) for m in ("torch", "transformers", "onnx", "onnxscript")),
        "the export extra (torch, transformers, onnx, onnxscript) is not installed")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from export.onnx_embedder import export_embedder, quantize_embedder  # noqa: E402
from pgenrm_lite.embedder import Embedder  # noqa: E402
from pgenrm_lite.errors import CheckpointError, ConfigError, EmbedderError, ExportError  # noqa: E402

# Different lengths (one far past max_length=256 tokens, so truncation is exercised),
# unicode, an empty string: one padded batch.
SENTENCES = [
    "The user prefers short, direct answers with working code examples.",
    "ok",
    "",
    "She values honesty above politeness and dislikes hedging; when a question is ambiguous she "
    "wants the assistant to say so and ask, rather than guess and write three paragraphs.",
    "Données personnelles, vie privée et 東京の天気 🚀",
    "Explain recursion to a five-year-old.",
    "word " * 400,
]
CANONICAL_SENTENCE = SENTENCES[0]
# First components of all-MiniLM-L6-v2's embedding of CANONICAL_SENTENCE, recorded from the
# torch reference below (transformers 5.24, torch 2.13); they guard against silent drift
# in tokenisation, pooling or export.
CANONICAL_HEAD = [-0.072958, 0.056510, -0.025266, 0.016908, -0.049940]


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_dir(minilm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "minilm"
    export_embedder(minilm_dir, out)
    return out


@pytest.fixture(scope="module")
def int8_dir(minilm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "minilm-int8"
    export_embedder(minilm_dir, out, int8=True)
    return out


@pytest.fixture(scope="module")
def fp32(fp32_dir) -> Embedder:
    return Embedder.from_dir(fp32_dir, device="cpu", threads=2)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """texts -> embeddings, computed the way sentence-transformers computes them."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    model = AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    return embed


def _link_copy(src: Path, dest: Path) -> Path:
    """Copy an exported embedder cheaply: hard-link the big model, copy the small files."""
    dest.mkdir()
    for item in src.iterdir():
        if item.suffix == ".onnx":
            os.link(item, dest / item.name)
        else:
            shutil.copyfile(item, dest / item.name)
    return dest


def _edit_description(root: Path, **changes) -> None:
    path = root / "embedder.json"
    desc = orjson.loads(path.read_bytes())
    desc.update(changes)
    path.write_bytes(orjson.dumps(desc))


# -- export ----------------------------------------------------------------------------------

def test_description_matches_graph(fp32_dir):
    desc = orjson.loads((fp32_dir / "embedder.json").read_bytes())
    assert desc["format"] == "pgenrm-lite-embedder" and desc["version"] == 1
    assert (desc["dimension"], desc["max_length"], desc["pooling"]) == (384, 256, "mean")
    assert desc["normalized"] is True and desc["normalize_from"] == "modules.json"
    assert desc["quantized"] is None
    assert desc["source"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert sorted(p.name for p in fp32_dir.iterdir()) == ["embedder.json", "model.onnx", "tokenizer.json"]
    session = ort.InferenceSession(str(fp32_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == desc["input_names"] == [
        "input_ids", "attention_mask", "token_type_ids"]
    for arg in session.get_inputs():  # dynamic batch and sequence axes
        assert all(isinstance(d, str) for d in arg.shape), arg.shape
    (out,) = session.get_outputs()
    assert out.name == "sentence_embedding" and isinstance(out.shape[0], str) and out.shape[1] == 384


def test_refuses_to_overwrite_without_force(fp32_dir, minilm_dir):
    with pytest.raises(ExportError, match="already exists"):
        export_embedder(minilm_dir, fp32_dir)


# -- parity -------------------------------------------------------------------------------------

def test_fp32_matches_torch_on_padded_batch(fp32, reference):
    lengths = [len(e.ids) for e in fp32._tokenizer.encode_batch(SENTENCES)]
    assert min(lengths) < 5 and max(lengths) == 256  # really padded, and truncated
    got = fp32.embed(SENTENCES, batch_size=len(SENTENCES))
    want = reference(SENTENCES)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
    assert np.abs(got - want).max() <= 1e-5


def test_small_batches_keep_order(fp32, reference):
    # batch_size 3 sorts by length and splits; rows must still line up with the input.
    got = fp32.embed(SENTENCES, batch_size=3)
    assert np.abs(got - reference(SENTENCES)).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_canonical_vector(fp32, reference):
    np.testing.assert_allclose(reference([CANONICAL_SENTENCE])[0, :5], CANONICAL_HEAD, atol=1e-4)
    np.testing.assert_allclose(fp32.embed([CANONICAL_SENTENCE])[0, :5], CANONICAL_HEAD, atol=1e-4)


def test_int8_close_to_fp32(int8_dir, fp32_dir, fp32):
    desc = orjson.loads((int8_dir / "embedder.json").read_bytes())
    assert desc["quantized"] == "int8" and desc["model_file"] == "model.onnx"
    assert (int8_dir / "model.onnx").stat().st_size < 0.5 * (fp32_dir / "model.onnx").stat().st_size
    assert not list(int8_dir.glob("*fp32*"))
    int8 = Embedder.from_dir(int8_dir, device="cpu", threads=2)
    a, b = int8.embed(SENTENCES), fp32.embed(SENTENCES)
    cosine = (a * b).sum(axis=1)
    assert cosine.mean() >= 0.99, cosine
    assert not np.allclose(a, b, atol=1e-4)  # really a different (quantised) graph


def test_empty_input_and_properties(fp32):
    assert fp32.embed([]).shape == (0, 384)
    assert (fp32.dimension, fp32.max_length) == (384, 256)
    assert fp32.providers == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="sequence of strings"):
        fp32.embed("a single string")
    with pytest.raises(ConfigError, match="batch_size"):
        fp32.embed(["x"], batch_size=0)


def test_model_without_token_type_ids(tmp_path, minilm_dir):
    """A DistilBERT (no token_type_ids) with CLS pooling and no Normalize module."""
    from transformers import DistilBertConfig, DistilBertModel

    src = tmp_path / "tiny-distilbert"
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    model = DistilBertModel(config).eval()
    model.save_pretrained(src)
    shutil.copyfile(minilm_dir / "tokenizer.json", src / "tokenizer.json")
    (src / "modules.json").write_bytes(orjson.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_bytes(orjson.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (src / "sentence_bert_config.json").write_bytes(orjson.dumps({"max_seq_length": 64}))

    summary = export_embedder(src, tmp_path / "out")
    desc = summary["description"]
    assert desc["input_names"] == ["input_ids", "attention_mask"]
    assert (desc["pooling"], desc["normalize_from"], desc["max_length"]) == ("cls", "exporter", 64)

    emb = Embedder.from_dir(tmp_path / "out", device="cpu")
    assert emb.input_names == ["input_ids", "attention_mask"]
    texts = SENTENCES[:3]
    got = emb.embed(texts)
    ids = [e.ids for e in emb._tokenizer.encode_batch(texts)]
    with torch.no_grad():
        cls = torch.stack([model(input_ids=torch.tensor([row])).last_hidden_state[0, 0] for row in ids])
    want = torch.nn.functional.normalize(cls, dim=1).numpy()
    assert np.abs(got - want).max() <= 1e-5


# -- bad input: run time ----------------------------------------------------------------------

def test_missing_description(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(EmbedderError, match="embedder.json is missing"):
        Embedder.from_dir(tmp_path)
    with pytest.raises(EmbedderError, match="does not exist"):
        Embedder.from_dir(tmp_path / "nowhere")


def test_missing_model_file(fp32_dir, tmp_path):
    root = _link_copy(fp32_dir, tmp_path / "emb")
    (root / "model.onnx").unlink()
    with pytest.raises(EmbedderError, match=r"model\.onnx is missing"):
        Embedder.from_dir(root)


def test_dimension_disagrees_with_graph(fp32_dir, tmp_path):
    root = _link_copy(fp32_dir, tmp_path / "emb")
    _edit_description(root, dimension=512)
    with pytest.raises(EmbedderError, match="says dimension 512 but the graph's 'sentence_embedding' has dimension 384"):
        Embedder.from_dir(root)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b'{"format": "something-else", "version": 1}', "not a pgenrm-lite-embedder description"),
    (b'{"format": "pgenrm-lite-embedder", "version": 99}', "version 99"),
])
def test_bad_description(fp32_dir, tmp_path, content, message):
    root = _link_copy(fp32_dir, tmp_path / "emb")
    (root / "embedder.json").write_bytes(content)
    with pytest.raises(EmbedderError, match=message):
        Embedder.from_dir(root)


def test_model_file_must_stay_inside(fp32_dir, tmp_path):
    root = _link_copy(fp32_dir, tmp_path / "emb")
    _edit_description(root, model_file="../model.onnx")
    with pytest.raises(EmbedderError, match="inside the directory"):
        Embedder.from_dir(root)


def test_device_choice(fp32_dir):
    with pytest.raises(ConfigError, match="device"):
        Embedder.from_dir(fp32_dir, device="tpu")
    with pytest.raises(ConfigError, match="threads"):
        Embedder.from_dir(fp32_dir, threads=0)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert Embedder.from_dir(fp32_dir, device="gpu").providers[0] == "CUDAExecutionProvider"
    else:
        with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider"):
            emb = Embedder.from_dir(fp32_dir, device="gpu")
        assert emb.providers == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto without a GPU is not worth a warning
        Embedder.from_dir(fp32_dir, device="auto")


def test_runtime_imports_no_toolchain():
    code = ("import sys, pgenrm_lite.embedder; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'export')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# -- bad input: export --------------------------------------------------------------------------

def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_export_refuses_non_sentence_transformers_dir(tmp_path, minilm_dir):
    src = tmp_path / "plain-bert"
    src.mkdir()
    shutil.copyfile(minilm_dir / "config.json", src / "config.json")
    outdir = tmp_path / "outs"
    outdir.mkdir()
    with pytest.raises(ExportError, match="not a sentence-transformers model"):
        export_embedder(src, outdir / "emb")
    assert _leftovers(outdir) == []

    from export.__main__ import main
    assert main(["onnx-embedder", "--hf", str(src), "--out", str(outdir / "emb")]) == 1
    assert _leftovers(outdir) == []


@pytest.mark.parametrize("pooling, message", [
    ({"pooling_mode_max_tokens": True}, r"pooling \['max'\]"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "exactly one"),
])
def test_export_refuses_unsupported_pooling(tmp_path, minilm_dir, pooling, message):
    src = tmp_path / "st"
    shutil.copytree(minilm_dir, src, ignore=shutil.ignore_patterns("model.safetensors"))
    (src / "1_Pooling" / "config.json").write_bytes(orjson.dumps(pooling))
    with pytest.raises(ExportError, match=message):
        export_embedder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_weights_leave_nothing_behind(tmp_path, minilm_dir):
    src = tmp_path / "st"
    shutil.copytree(minilm_dir, src, ignore=shutil.ignore_patterns("model.safetensors"))
    with open(minilm_dir / "model.safetensors", "rb") as fh:
        (src / "model.safetensors").write_bytes(fh.read(4096))
    outdir = tmp_path / "outs"
    outdir.mkdir()
    with pytest.raises(CheckpointError, match="cannot load the transformer"):
        export_embedder(src, outdir / "emb")
    assert _leftovers(outdir) == []  # neither the output nor its temporary sibling


def test_max_length_beyond_positions_is_refused(tmp_path, minilm_dir):
    with pytest.raises(ExportError, match="exceeds the model's 512 position embeddings"):
        export_embedder(minilm_dir, tmp_path / "out", max_length=600)
    assert _leftovers(tmp_path) == []


def test_quantize_embedder_wants_fp32_source(int8_dir, tmp_path):
    with pytest.raises(ExportError, match="does not describe an fp32"):
        quantize_embedder(int8_dir, tmp_path / "again")
    assert _leftovers(tmp_path) == []
