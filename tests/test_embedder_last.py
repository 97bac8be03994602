"""Last-token pooling (decoder embedders such as Qwen3-Embedding): export and run time.

A tiny random Qwen3 around the real Qwen3 tokenizer, laid out as a sentence-transformers
folder with last-token pooling and a query prompt; the ONNX graph must match torch on a
padded batch, and the runtime must give the same vectors with left and right padding.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
require(all(importlib.util.find_spec(m) for m in ("torch", "transformers", "onnx", "onnxscript")),
        "the export extra (torch, transformers, onnx, onnxscript) is not installed")

import torch  # noqa: E402

from export.onnx_embedder import export_embedder  # noqa: E402
from pgenrm_lite.embedder import Embedder  # noqa: E402
from pgenrm_lite.errors import ConfigError  # noqa: E402

QUERY_PROMPT = "Instruct: Given a persona, find users who judge alike\nQuery: "
TEXTS = ["The user prefers short, direct answers with working code examples.",
         "ok",
         "Données personnelles, vie privée et 東京の天気 🚀 " * 3,
         "She values honesty above politeness and dislikes hedging. " * 12]


@pytest.fixture(scope="module")
def qwen3_st_dir(tmp_path_factory, real_tokenizer, export_deps) -> Path:
    """sentence-transformers layout around a tiny random Qwen3 with the real Qwen3 tokenizer."""
    real_tokenizer("qwen3")
    from tiny_models import build_real_tokenizer_checkpoint

    root = build_real_tokenizer_checkpoint(tmp_path_factory.mktemp("qwen3_st") / "model", "qwen3")
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
         "pooling_mode_lasttoken": True}))
    (root / "2_Normalize").mkdir()
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}))
    (root / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": QUERY_PROMPT,
                                                                                    "document": ""}}))
    return root


@pytest.fixture(scope="module")
def exported(qwen3_st_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("qwen3_onnx") / "emb"
    return export_embedder(qwen3_st_dir, out), out


def _torch_reference(model_dir: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Last kept token of each row by a plain loop (no shared code with the exporter), then L2."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).float().eval()
    m = torch.from_numpy(mask)
    pos = (m.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=m, position_ids=pos).last_hidden_state
    rows = [hidden[b, int(np.flatnonzero(mask[b])[-1])] for b in range(len(ids))]
    return torch.nn.functional.normalize(torch.stack(rows), dim=1).numpy()


def _unpadded_reference(model_dir: Path, token_rows: list[list[int]]) -> np.ndarray:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).float().eval()
    out = []
    with torch.no_grad():
        for row in token_rows:
            h = model(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
            out.append(torch.nn.functional.normalize(h, dim=0).numpy())
    return np.stack(out)


def _padded(token_rows, side: str) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in token_rows)
    ids = np.zeros((len(token_rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(token_rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def test_description_records_last_pooling_and_query_prefix(exported):
    summary, out = exported
    desc = json.loads((out / "embedder.json").read_text())
    assert desc["pooling"] == "last" and desc["query_prefix"] == QUERY_PROMPT
    assert desc["max_length"] == 96 and desc["dimension"] == 64
    assert summary["check"]["fp32_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("side", ["right", "left"])
def test_onnx_matches_torch_on_padded_batch(exported, qwen3_st_dir, side):
    import onnxruntime as ort

    _, out = exported
    emb = Embedder.from_dir(out, device="cpu")
    rows = [e.ids for e in emb._tokenizer.encode_batch(TEXTS)]
    assert len({len(r) for r in rows}) == len(rows) and max(len(r) for r in rows) == 96  # padded, one truncated
    ids, mask = _padded(rows, side)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    want = _torch_reference(qwen3_st_dir, ids, mask)
    assert np.abs(got - want).max() <= 1e-5
    # and padding changes nothing: each text alone, unpadded
    assert np.abs(got - _unpadded_reference(qwen3_st_dir, rows)).max() <= 1e-5


def test_runtime_pads_either_side_and_prefixes_queries(exported, qwen3_st_dir):
    _, out = exported
    right = Embedder.from_dir(out, device="cpu")
    left = Embedder.from_dir(out, device="cpu", padding_side="left")
    a, b = right.embed(TEXTS), left.embed(TEXTS)
    assert np.abs(a - b).max() <= 1e-5
    rows = [e.ids for e in right._tokenizer.encode_batch(TEXTS)]
    assert np.abs(a - _unpadded_reference(qwen3_st_dir, rows)).max() <= 1e-5
    assert right.query_prefix == QUERY_PROMPT
    q = right.embed(TEXTS[:1], query=True)
    assert np.allclose(q, right.embed([QUERY_PROMPT + TEXTS[0]]), atol=1e-6)
    assert not np.allclose(q, a[:1], atol=1e-3)


def test_left_padding_refused_for_mean_pooling(tmp_path, exported):
    _, out = exported
    desc = json.loads((out / "embedder.json").read_text())
    other = tmp_path / "emb"
    other.mkdir()
    for f in ("model.onnx", "tokenizer.json"):
        (other / f).symlink_to(out / f)
    (other / "embedder.json").write_text(json.dumps({**desc, "pooling": "mean"}))
    with pytest.raises(ConfigError, match="last-token"):
        Embedder.from_dir(other, device="cpu", padding_side="left")

