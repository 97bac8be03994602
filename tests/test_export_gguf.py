"""GGUF export: llama.cpp against transformers on tiny random checkpoints, and bad input.

Every check runs the real converter, the real llama.cpp (llama-cpp-python) and the real
transformers model; nothing is mocked. Checkpoints are built once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, require

for _module in ("torch", "transformers", "tokenizers", "gguf", "sentencepiece", "llama_cpp"):
    try:
        __import__(_module)
    except ImportError:
        require(False, f"{_module} is not importable: install the export extra to test GGUF export")

import gguf  # noqa: E402
import llama_cpp  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(REPO))
from export.gguf_convert import convert  # noqa: E402
from pgenrm_lite.errors import (CheckpointError, TokenizerExportError,  # noqa: E402
                                UnsupportedArchitectureError)
from tiny_models import CHATML_TEMPLATE, CORPUS, build_tiny_checkpoint  # noqa: E402

torch.set_num_threads(2)

PROMPTS = [
    "The user prefers short answers with concrete examples and no filler.",
    "<|im_start|>user\nHow do I sort a list in Python?<|im_end|>\n<|im_start|>assistant\n",
    "Café 123 🚀 Привет 我想在苹果工作\n\n   spaced\ttabs 3.14159",
    CORPUS[:900],  # long: positions well past the llama3 rope's original context (64)
]

# at least 20 strings: unicode, runs of spaces and newlines, digits, special tokens
TOKENIZER_STRINGS = [
    "Hello world", "  leading spaces", "trailing spaces   ", "a  b   c    d      e",
    "line1\nline2\n\nline4\n\n\n", "\t tabs\t\tand\n \n mixed", "\r\n windows\r\nnewlines",
    "123 4567 89012 3.14159 1e-3 -42 1,250,000", "café naïve résumé Zürich", "Привет, как дела?",
    "我想在苹果工作。", "日本語 한국어 ελληνικά", "emoji 🚀✅😀🦙 ok 😶\u200d🌫️",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<s>text</s>",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL", "def f(x):\n    return x * 2\n",
    '{"better_response": {"response_1": 8.5, "response_2": "6"}}', " ", "\n", "!!!???...---===",
    "https://example.org/path?q=1&r=2", "MiXeD CaSe WoRdS", "ẞ ǅ ﬁ ½ ² ligatures",
    "zero\u200bwidth\u200djoiner", "<|im_end|><|im_end|>", "ab<|im_start|>cd", "",
]
SPECIAL_TEXTS = ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|endoftext|>")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def workdir(tmp_path_factory, export_deps) -> Path:
    return tmp_path_factory.mktemp("export_gguf")


@pytest.fixture(scope="module")
def checkpoint(workdir):
    """checkpoint(arch, tokenizer="bpe", **overrides) -> folder, built once per module."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, tokenizer: str = "bpe", **overrides) -> Path:
        key = (arch, tokenizer, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            name = f"{arch}-{tokenizer}-{len(cache)}"
            cache[key] = build_tiny_checkpoint(workdir / name, arch, tokenizer=tokenizer, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def gguf_file(checkpoint, workdir):
    """gguf_file(arch, outtype, tokenizer="bpe") -> converted GGUF, once per module."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, outtype: str, tokenizer: str = "bpe") -> Path:
        key = (arch, outtype, tokenizer)
        if key not in cache:
            out = workdir / f"{arch}-{tokenizer}-{outtype}.gguf"
            convert(checkpoint(arch, tokenizer), out, outtype=outtype,
                    bpe_pre="gpt-2" if tokenizer == "bpe" else None, progress=False)
            cache[key] = out
        return cache[key]

    return get


def load_llama(path: Path, **kw) -> llama_cpp.Llama:
    # f32 KV cache (type 0): the default f16 cache alone costs ~1e-3 relative error
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2,
                           verbose=False, type_k=0, type_v=0, **kw)


def llama_cpp_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(hf_dir: Path, prompts_ids: list[list[int]]) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts_ids]


def tokenize_prompts(llm: llama_cpp.Llama) -> list[list[int]]:
    # at most 400 tokens: the tiny models' max_position_embeddings is 512
    return [llm.tokenize(p.encode(), add_bos=True, special=True)[:400] for p in PROMPTS]


def reader_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def assert_clean(directory: Path, expect: set[str] = frozenset()) -> None:
    """Nothing but `expect` in the output directory: no half-written file, no temp file."""
    assert {p.name for p in directory.iterdir()} == set(expect)


# ----------------------------------------------------------------------------- logit parity

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_logits_match_transformers(arch, checkpoint, gguf_file):
    llm = load_llama(gguf_file(arch, "f32"), logits_all=True)
    try:
        prompts = tokenize_prompts(llm)
        assert max(len(p) for p in prompts) > 150
        ours = [llama_cpp_logits(llm, ids) for ids in prompts]
    finally:
        llm.close()
    for _ids, a, b in zip(prompts, ours, hf_logits(checkpoint(arch), prompts)):
        assert a.shape == b.shape
        scale = np.abs(b).max()
        assert scale > 0.1  # the model is not degenerate
        assert np.abs(a - b).max() <= 1e-3 * scale, (arch, np.abs(a - b).max() / scale)
        assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_q8_0_argmax_mostly_matches(arch, checkpoint, gguf_file):
    path = gguf_file(arch, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    llm = load_llama(path, logits_all=True)
    try:
        prompts = tokenize_prompts(llm)
        ours = [llama_cpp_logits(llm, ids) for ids in prompts]
    finally:
        llm.close()
    refs = hf_logits(checkpoint(arch), prompts)
    agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, refs)])
    assert agree.mean() >= 0.95, agree.mean()


def test_spm_checkpoint_logits_and_tokens(checkpoint, gguf_file):
    """SentencePiece path: logits, and tokens against sentencepiece itself.

    llama.cpp's SPM tokenizer splits out special tokens first and gives every text
    fragment its own leading space (the "legacy" Llama behaviour), so the reference
    encodes each fragment separately with sentencepiece.
    """
    import sentencepiece as spm

    hf_dir = checkpoint("llama", "spm")
    path = gguf_file("llama", "f32", "spm")
    reader = gguf.GGUFReader(path)
    assert reader_value(reader, "tokenizer.ggml.model") == "llama"
    assert reader_value(reader, "tokenizer.ggml.add_bos_token") is True
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    llm = load_llama(path, logits_all=True)
    try:
        for text in TOKENIZER_STRINGS:
            got = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert got == spm_reference(sp, text, llm), text
        prompts = tokenize_prompts(llm)
        assert all(p[0] == sp.bos_id() for p in prompts)
        ours = [llama_cpp_logits(llm, ids) for ids in prompts]
    finally:
        llm.close()
    for a, b in zip(ours, hf_logits(hf_dir, prompts)):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_llama_linear_rope_and_tied_embeddings(checkpoint, workdir):
    """Llama 2-style linear rope scaling, and SmolLM-style tied embeddings on Llama."""
    hf_dir = checkpoint("llama", rope_scaling={"rope_type": "linear", "factor": 4.0},
                        tie_word_embeddings=True)
    out = workdir / "llama-linear-tied.gguf"
    convert(hf_dir, out, outtype="f32", bpe_pre="gpt-2", progress=False)
    reader = gguf.GGUFReader(out)
    assert reader_value(reader, "llama.rope.scaling.type") == "linear"
    assert reader_value(reader, "llama.rope.scaling.factor") == 4.0
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "rope_freqs.weight" not in names
    llm = load_llama(out, logits_all=True)
    try:
        prompts = tokenize_prompts(llm)[2:]
        ours = [llama_cpp_logits(llm, ids) for ids in prompts]
    finally:
        llm.close()
    for a, b in zip(ours, hf_logits(hf_dir, prompts)):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
        assert (a.argmax(-1) == b.argmax(-1)).all()


def spm_reference(sp, text: str, llm: llama_cpp.Llama) -> list[int]:
    # control tokens (<s>, </s>) and user-defined ones (<|im_start|>) are matched verbatim
    specials = {t: sp.piece_to_id(t) for t in SPECIAL_TEXTS if sp.piece_to_id(t) != sp.unk_id()}
    ids: list[int] = []
    rest = text
    while rest:
        hits = [(rest.find(t), t) for t in specials if t in rest]
        if not hits:
            ids += sp.encode(rest)
            break
        pos, tok = min(hits)
        if pos:
            ids += sp.encode(rest[:pos])
        ids.append(specials[tok])
        rest = rest[pos + len(tok):]
    return ids


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bpe_tokenization_matches_tokenizers(arch, checkpoint, gguf_file):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(checkpoint(arch) / "tokenizer.json"))
    llm = load_llama(gguf_file(arch, "f32"), vocab_only=True)
    try:
        assert len(TOKENIZER_STRINGS) >= 20
        n_special = 0
        for text in TOKENIZER_STRINGS:
            want = ref.encode(text, add_special_tokens=False).ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
            n_special += any(ref.id_to_token(i) in SPECIAL_TEXTS for i in want)
        assert n_special >= 3  # the special-token strings really produced special ids
        # BOS: Llama's tokenizer adds <s>, Qwen's adds nothing; llama.cpp must agree
        with_bos = llm.tokenize(b"hello", add_bos=True, special=True)
        assert with_bos == ref.encode("hello").ids
    finally:
        llm.close()


def test_metadata(gguf_file, checkpoint):
    """Hyperparameters, special tokens and chat template as llama.cpp reads them."""
    cfg = json.loads((checkpoint("llama") / "config.json").read_text())
    reader = gguf.GGUFReader(gguf_file("llama", "f32"))
    names = {t.name for t in reader.tensors}
    assert reader_value(reader, "general.architecture") == "llama"
    assert reader_value(reader, "llama.attention.head_count_kv") == cfg["num_key_value_heads"] == 2
    assert reader_value(reader, "llama.attention.head_count") == 4
    assert reader_value(reader, "llama.context_length") == cfg["max_position_embeddings"]
    assert reader_value(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert reader_value(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert reader_value(reader, "tokenizer.ggml.bos_token_id") == cfg["bos_token_id"]
    assert reader_value(reader, "tokenizer.ggml.eos_token_id") == cfg["eos_token_id"]
    assert "rope_freqs.weight" in names and "output.weight" in names

    qwen2 = gguf.GGUFReader(gguf_file("qwen2", "f32"))
    q2_names = {t.name for t in qwen2.tensors}
    assert "output.weight" not in q2_names  # tied: llama.cpp reuses token_embd
    assert "blk.0.attn_q.bias" in q2_names
    n_tok = len(reader_value(qwen2, "tokenizer.ggml.tokens"))
    assert n_tok == json.loads((checkpoint("qwen2") / "config.json").read_text())["vocab_size"]
    assert reader_value(qwen2, "tokenizer.ggml.add_bos_token") is False

    qwen3 = gguf.GGUFReader(gguf_file("qwen3", "f32"))
    assert "blk.1.attn_k_norm.weight" in {t.name for t in qwen3.tensors}
    assert reader_value(qwen3, "qwen3.attention.key_length") == 32

    llm = load_llama(gguf_file("llama", "f32"), vocab_only=True)
    try:
        assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
        assert llm.detokenize([llm.token_eos()], special=True) == b"<|im_end|>"
    finally:
        llm.close()


# ----------------------------------------------------------------------------- formats

def test_sharded_bf16_checkpoint(checkpoint, workdir, tmp_path):
    """A sharded bf16 checkpoint (the published checkpoints' format): read across shards,
    bf16 written bit for bit, f16 within rounding."""
    from safetensors import safe_open

    src = checkpoint("llama")
    sharded = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(sharded, max_shard_size="150KB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, sharded / f.name)
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    assert (sharded / "model.safetensors.index.json").exists()

    out = tmp_path / "out"
    out.mkdir()
    convert(sharded, out / "m.gguf", outtype="bf16", bpe_pre="gpt-2", progress=False)
    convert(sharded, out / "m16.gguf", outtype="f16", bpe_pre="gpt-2", progress=False)
    assert_clean(out, {"m.gguf", "m16.gguf"})
    bf16 = {t.name: t for t in gguf.GGUFReader(out / "m.gguf").tensors}
    f16 = {t.name: t for t in gguf.GGUFReader(out / "m16.gguf").tensors}
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(sharded / index["model.layers.1.mlp.down_proj.weight"], "pt") as fh:
        want = fh.get_tensor("model.layers.1.mlp.down_proj.weight")
    got_bits = np.asarray(bf16["blk.1.ffn_down.weight"].data).view(np.uint16).reshape(want.shape)
    assert (got_bits == want.view(torch.uint16).numpy()).all()
    got16 = np.asarray(f16["blk.1.ffn_down.weight"].data).reshape(want.shape)
    np.testing.assert_allclose(got16, want.float().numpy(), rtol=1e-3, atol=1e-6)

    llm = load_llama(out / "m.gguf", logits_all=True)
    try:
        ids = llm.tokenize(PROMPTS[0].encode(), add_bos=True, special=True)
        a = llama_cpp_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        b = model.float()(torch.tensor([ids])).logits[0].numpy()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_q4_k_m_through_llama_cpp_quantizer(checkpoint, tmp_path):
    # k-quants need rows of 256 values; llama.cpp falls back for rows that do not divide
    hf_dir = checkpoint("llama", hidden_size=256, intermediate_size=512)
    out = tmp_path / "out"
    summary = convert(hf_dir, out / "m.gguf", outtype="q4_k_m", bpe_pre="gpt-2", progress=False)
    assert_clean(out, {"m.gguf"})  # the intermediate f16 file is gone
    reader = gguf.GGUFReader(out / "m.gguf")
    assert reader_value(reader, "general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert gguf.GGMLQuantizationType.Q6_K in types.values()
    assert summary.n_bytes == (out / "m.gguf").stat().st_size
    llm = load_llama(out / "m.gguf", logits_all=True)
    try:
        ids = llm.tokenize(PROMPTS[1].encode(), add_bos=True, special=True)
        a = llama_cpp_logits(llm, ids)
        text = llm.create_completion("Hello", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    (b,) = hf_logits(hf_dir, [ids])
    assert np.isfinite(a).all() and isinstance(text, str)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


# ----------------------------------------------------------------------------- bad input

def copy_checkpoint(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in skip])
    return dst


def test_unsupported_architecture(checkpoint, tmp_path):
    hf = copy_checkpoint(checkpoint("llama"), tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsupportedArchitectureError) as err:
        convert(hf, out / "m.gguf", outtype="f16", bpe_pre="gpt-2")
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg
    assert all(a in msg for a in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"))
    assert_clean(out)


def test_missing_tokenizer(checkpoint, tmp_path):
    hf = copy_checkpoint(checkpoint("llama"), tmp_path / "hf",
                         skip=("tokenizer.json", "tokenizer.model"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TokenizerExportError, match="no tokenizer found.*tokenizer.json"):
        convert(hf, out / "m.gguf", outtype="f16")
    assert_clean(out)


def test_unknown_bpe_pretokenizer_needs_override(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TokenizerExportError, match="--bpe-pre") as err:
        convert(checkpoint("qwen2"), out / "m.gguf", outtype="f16")
    assert "unknown BPE pre-tokenizer" in str(err.value)
    assert_clean(out)
    summary = convert(checkpoint("qwen2"), out / "m.gguf", outtype="f16", bpe_pre="gpt-2")
    assert summary.bpe_pre == "gpt-2"
    assert_clean(out, {"m.gguf"})


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_safetensors(checkpoint, tmp_path, where):
    hf = copy_checkpoint(checkpoint("llama"), tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000] if where == "data" else data[:100])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.gguf").write_bytes(b"previous export")
    with pytest.raises(CheckpointError, match="truncated") as err:
        convert(hf, out / "keep.gguf", outtype="f16", bpe_pre="gpt-2")
    assert "model.safetensors" in str(err.value)
    assert_clean(out, {"keep.gguf"})
    assert (out / "keep.gguf").read_bytes() == b"previous export"  # old output untouched


def test_interrupted_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    """Ctrl-C half way through writing tensors: no output file, no temporary file."""
    import export.gguf_convert as gc

    real, calls = gc.encode_tensor, []

    def interrupt_on_fifth(t, ty):
        calls.append(t.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(t, ty)

    monkeypatch.setattr(gc, "encode_tensor", interrupt_on_fifth)
    out = tmp_path / "out"
    out.mkdir()
    for outtype in ("f16", "q4_k_m"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            convert(checkpoint("llama"), out / "m.gguf", outtype=outtype, bpe_pre="gpt-2")
        assert len(calls) == 5
        assert_clean(out)


def test_cli(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    base = [sys.executable, "-m", "export", "gguf", "--hf", str(checkpoint("qwen3"))]
    ok = subprocess.run(base + ["--out", str(out), "--outtype", "q8_0", "--bpe-pre", "gpt-2"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "25 tensors" in ok.stdout and "q8_0" in ok.stdout and out.exists()
    bad = subprocess.run(base + ["--out", str(tmp_path / "x.gguf")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error:" in bad.stderr and "--bpe-pre" in bad.stderr
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------- benchmark

def test_convert_memory_benchmark_tiny(tmp_path, export_deps):
    result_file = tmp_path / "convert_memory.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "convert_memory.py"), "--tiny",
                          "--out", str(result_file), "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(result_file.read_text())
    assert result["n_shards"] >= 2
    assert result["checkpoint_bytes"] > 0 and result["gguf_bytes"] > 0
    # a real peak was measured: at least the interpreter, and less than this machine's RAM
    assert 10 * 2**20 < result["peak_rss_bytes"] < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert result["ratio"] == pytest.approx(result["peak_rss_bytes"] / result["checkpoint_bytes"])
    assert "peak RSS" in run.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["convert_memory.json"]  # temp dir removed


# ----------------------------------------------------------------------------- real model

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PGENRM_SLOW") != "1", reason="slow (~40 s): set PGENRM_SLOW=1")
def test_smollm2_roundtrip(smollm2_gguf, tmp_path):
    """A real checkpoint and tokenizer: SmolLM2-135M-Instruct, which transformers can read
    from its GGUF (undoing llama.cpp's q/k permutation), saved as bf16 safetensors and
    converted back. The pre-tokenizer must be recognised by hash as "smollm"."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    hf = tmp_path / "hf"
    hf.mkdir()
    tied = model.config.tie_word_embeddings
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}, str(hf / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (hf / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    AutoTokenizer.from_pretrained(**src).save_pretrained(hf)
    del model

    summary = convert(hf, tmp_path / "smol.gguf", outtype="f32", progress=False)
    assert summary.bpe_pre == "smollm" and summary.vocab_size == 49152

    ref = Tokenizer.from_file(str(hf / "tokenizer.json"))
    llm = load_llama(tmp_path / "smol.gguf", logits_all=True)
    try:
        # "other number" characters (½ ²) aside: the tokenizer.json rebuilt from the GGUF has
        # the plain GPT-2 regex, while llama.cpp applies SmolLM's own splitting rules to them
        for text in [t for t in TOKENIZER_STRINGS if "½" not in t]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                ref.encode(text, add_special_tokens=False).ids, text
        ids = llm.tokenize(PROMPTS[1].encode(), add_bos=True, special=True)
        a = llama_cpp_logits(llm, ids)
        reply = llm.create_chat_completion(
            [{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0.0)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    (b,) = hf_logits(hf, [ids])
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert "Paris" in reply
