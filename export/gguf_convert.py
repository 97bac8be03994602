"""`python -m export gguf`: a Hugging Face causal LM checkpoint to a llama.cpp GGUF file.

Supported: LlamaForCausalLM (Llama 2/3/3.1, SmolLM), Qwen2ForCausalLM, Qwen3ForCausalLM.
Output types f32/f16/bf16/q8_0 are written here with gguf-py; q4_k_m is written as an
f16 (or bf16) GGUF first and then quantised by llama.cpp's own quantiser.

Memory: tensors are read one at a time straight from the safetensors files (our own
reader: no mmap whose touched pages would count as resident, no torch, and bf16 read
as raw 16-bit words) and written out before the next is read, so the peak is about one
tensor plus the interpreter, whatever the checkpoint size.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pgenrm_lite._atomic import atomic_path
from pgenrm_lite._progress import Progress
from pgenrm_lite.errors import (CheckpointError, ExportError, TokenizerExportError,
                                UnsupportedArchitectureError)

# Hugging Face architecture -> llama.cpp architecture name
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")

# llama.cpp's general.file_type values (enum llama_ftype)
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}
_QUANT_VERSION = 2  # GGML_QNT_VERSION

# GGUF token types (same numbering as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---------------------------------------------------------------------------------------
# BPE pre-tokenizer detection. llama.cpp picks its pre-tokenizer (the regex that splits
# text before BPE) from `tokenizer.ggml.pre`. Its converter identifies a family by
# tokenizing a fixed probe text and hashing the token ids (sha256 of str(list_of_ids));
# we do the same with the same probe so the hashes below (from llama.cpp's converter
# table) keep their meaning.
_PRE_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_BPE_PRE: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3/3.1
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen 1.5/2/2.5/3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM 1/2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}
_PRE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ConvertSummary:
    path: Path
    arch: str
    outtype: str
    n_tensors: int
    n_bytes: int
    seconds: float
    n_params: int
    vocab_size: int
    tokenizer: str            # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    bpe_pre: str | None
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        pre = f", pre-tokenizer {self.bpe_pre}" if self.bpe_pre else ""
        return (f"wrote {self.path}: {self.arch}, {self.outtype}, {self.n_tensors} tensors, "
                f"{self.n_params / 1e6:.1f}M parameters, {self.n_bytes / 2**20:.1f} MiB, "
                f"vocab {self.vocab_size} ({self.tokenizer}{pre}), {self.seconds:.1f} s")


# =======================================================================================
# Reading safetensors

_ST_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),  # raw bf16 bits
    "F64": np.dtype("<f8"),
}


@dataclass
class TensorRef:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """Parse and check one safetensors file's header without reading its data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
            n = int.from_bytes(raw_len, "little")
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes): "
                                      "the file is truncated or not safetensors")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: malformed safetensors header ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        refs[name] = _tensor_ref(path, name, info, base, size)
    return refs


def _tensor_ref(path: Path, name: str, info: dict, base: int, size: int) -> TensorRef:
    try:
        dtype, shape, (lo, hi) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed header entry for {name!r}") from exc
    if dtype not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; only F32, F16, BF16 and "
                              "F64 checkpoints can be converted (dequantise it first)")
    expected = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if hi - lo != expected:
        raise CheckpointError(f"{path}: tensor {name!r} spans {hi - lo} bytes, its shape needs {expected}")
    if base + hi > size:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {base + hi} but the file has only "
                              f"{size} bytes: the file is truncated (copy or download it again)")
    return TensorRef(path, dtype, shape, base + lo, base + hi)


def index_checkpoint(hf_dir: Path) -> dict[str, TensorRef]:
    """Every tensor of the checkpoint (single file or sharded with an index), headers checked."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from exc
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").exists():
        weight_map, files = {}, ["model.safetensors"]
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        weight_map = {}
        if not files:
            hint = " (pytorch_model.bin is not supported: re-save with safetensors)" \
                if any(hf_dir.glob("pytorch_model*.bin")) else ""
            raise CheckpointError(f"{hf_dir}: no *.safetensors weights found{hint}")
    refs: dict[str, TensorRef] = {}
    for name in files:
        path = hf_dir / name
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
        refs.update(read_safetensors_header(path))
    missing = sorted(set(weight_map) - set(refs))
    if missing:
        raise CheckpointError(f"{hf_dir}: tensors listed in the index are absent from the shards: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return refs


def load_raw(ref: TensorRef) -> np.ndarray:
    """The tensor's stored values (bf16 as uint16 words), shaped; one read, one copy."""
    dt = _ST_DTYPES[ref.dtype]
    with open(ref.file, "rb") as fh:
        fh.seek(ref.start)
        arr = np.fromfile(fh, dtype=dt, count=ref.n_elements)
    if arr.size != ref.n_elements:
        raise CheckpointError(f"{ref.file}: short read ({arr.size} of {ref.n_elements} values): "
                              "the file is truncated")
    return arr.reshape(ref.shape)


def to_f32(raw: np.ndarray, src_dtype: str) -> np.ndarray:
    if src_dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


# =======================================================================================
# Model description: hyperparameters and the tensor plan

@dataclass
class ModelSpec:
    hf_arch: str
    arch: str                 # llama.cpp name
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_type: str            # default | linear | llama3
    rope: dict
    tied: bool

    @property
    def permute_qk(self) -> bool:
        # llama.cpp's llama graph rotates adjacent pairs; HF Llama rotates halves. Qwen
        # graphs use the NeoX (halves) layout, so their weights go in unchanged.
        return self.arch == "llama"


def read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{hf_dir}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from exc


def model_spec(cfg: dict) -> ModelSpec:
    try:
        return _model_spec(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json lacks or mangles a hyperparameter the converter needs: {exc}") from exc


def _model_spec(cfg: dict) -> ModelSpec:
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else f"<none; model_type={cfg.get('model_type')!r}>"
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {hf_arch} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    n_head = int(cfg["num_attention_heads"])
    n_embd = int(cfg["hidden_size"])
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})  # transformers 5 spelling wins
    rope_type = str(rope.get("rope_type") or rope.get("type") or "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"{hf_arch} with rope scaling type {rope_type!r} is not supported "
            "(supported: none, 'linear', 'llama3')")
    if rope_type == "llama3" and hf_arch != "LlamaForCausalLM":
        raise UnsupportedArchitectureError(f"'llama3' rope scaling is only supported for Llama, not {hf_arch}")
    return ModelSpec(
        hf_arch=hf_arch, arch=SUPPORTED_ARCHITECTURES[hf_arch],
        n_layer=int(cfg["num_hidden_layers"]), n_embd=n_embd, n_ff=int(cfg["intermediate_size"]),
        n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(cfg.get("head_dim") or n_embd // n_head),
        n_ctx=int(cfg.get("max_position_embeddings") or 4096), vocab_size=int(cfg["vocab_size"]),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_type=rope_type, rope=rope, tied=bool(cfg.get("tie_word_embeddings", False)))


@dataclass
class PlannedTensor:
    name: str                             # GGUF name
    shape: tuple[int, ...]                # numpy (row-major) shape
    load: Callable[[], np.ndarray]        # float32 or raw stored values
    src_dtype: str                        # "F32" | "F16" | "BF16" | "F64"
    permute_heads: int = 0                # >0: reorder rows for llama.cpp's rope layout

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_REQUIRED_PER_LAYER = ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight",
                       "attn_v.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight",
                       "ffn_down.weight")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a HF tensor; None for tensors llama.cpp does not use."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = _LAYER_RE.match(hf_name)
    if m:
        if m.group(2).endswith("rotary_emb.inv_freq"):
            return None  # recomputed by llama.cpp from the rope hyperparameters
        suffix = _LAYER_MAP.get(m.group(2))
        if suffix is not None:
            return f"blk.{m.group(1)}.{suffix}"
    raise UnsupportedArchitectureError(f"unexpected tensor {hf_name!r}: the checkpoint does not look "
                                       "like a plain LlamaForCausalLM/Qwen2ForCausalLM/Qwen3ForCausalLM")


def plan_tensors(spec: ModelSpec, refs: dict[str, TensorRef]) -> list[PlannedTensor]:
    plan: list[PlannedTensor] = []
    if spec.rope_type == "llama3":
        factors = llama3_rope_factors(spec)
        plan.append(PlannedTensor("rope_freqs.weight", factors.shape, lambda f=factors: f, "F32"))
    for hf_name, ref in refs.items():
        name = gguf_name(hf_name)
        if name is None or (name == "output.weight" and spec.tied):
            continue
        heads = 0
        if spec.permute_qk and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
            heads = spec.n_head if ".attn_q." in name else spec.n_head_kv
        plan.append(PlannedTensor(name, ref.shape, lambda r=ref: load_raw(r), ref.dtype, heads))
    _check_complete(spec, {t.name for t in plan})
    return plan


def _check_complete(spec: ModelSpec, names: set[str]) -> None:
    needed = ["token_embd.weight", "output_norm.weight"]
    if not spec.tied:
        needed.append("output.weight")
    for i in range(spec.n_layer):
        needed += [f"blk.{i}.{s}" for s in _REQUIRED_PER_LAYER]
        if spec.arch == "qwen2":
            needed += [f"blk.{i}.attn_{x}.bias" for x in "qkv"]
        if spec.arch == "qwen3":
            needed += [f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"]
    missing = [n for n in needed if n not in names]
    if missing:
        hint = " (lm_head.weight absent and tie_word_embeddings is false)" if "output.weight" in missing else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) {spec.hf_arch} needs: "
                              f"{missing[:6]}{' ...' if len(missing) > 6 else ''}{hint}")


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies to rope theta (its rope_freqs tensor).

    Llama 3.1 keeps high frequencies, divides low ones by `factor` and blends in between;
    llama.cpp takes that as theta / f, so f is old_freq / new_freq for each band.
    """
    r = spec.rope
    factor, lo, hi = float(r["factor"]), float(r["low_freq_factor"]), float(r["high_freq_factor"])
    old_ctx = float(r["original_max_position_embeddings"])
    freqs = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, mid))
    return out.astype(np.float32)


def permute_rows_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's [first halves | second halves] to interleaved pairs."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


# =======================================================================================
# Tokenizer

@dataclass
class Vocab:
    model: str                            # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)   # bos/eos/unk/pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def load_vocab(hf_dir: Path, vocab_size: int, bpe_pre: str | None = None) -> Vocab:
    """The tokenizer as llama.cpp wants it: SentencePiece if tokenizer.model is one, else byte-level BPE."""
    tok_cfg = _read_json(hf_dir / "tokenizer_config.json") or {}
    spm_path, json_path = hf_dir / "tokenizer.model", hf_dir / "tokenizer.json"
    vocab = None
    if spm_path.exists():
        vocab = _spm_vocab(spm_path, hf_dir, tok_cfg, vocab_size)
    if vocab is None:
        if not json_path.exists():
            raise TokenizerExportError(
                f"{hf_dir}: no tokenizer found: expected tokenizer.json (byte-level BPE) or "
                "tokenizer.model (SentencePiece); copy the tokenizer files next to the weights")
        vocab = _bpe_vocab(json_path, tok_cfg, vocab_size, bpe_pre)
    vocab.chat_template = _chat_template(hf_dir, tok_cfg)
    return vocab


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerExportError(f"{path}: malformed JSON ({exc})") from exc


def _token_text(value) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _fill_vocab(id_to_tok: dict[int, tuple[str, int]], vocab_size: int, src: Path) -> tuple[list[str], list[int]]:
    top = max(id_to_tok, default=-1)
    if top >= vocab_size:
        raise TokenizerExportError(f"{src}: token id {top} does not fit the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        text, ttype = id_to_tok.get(i, (f"[PAD{i}]", UNUSED))  # embedding rows with no token
        tokens.append(text)
        types.append(ttype)
    return tokens, types


def _bpe_vocab(path: Path, tok_cfg: dict, vocab_size: int, bpe_pre: str | None) -> Vocab:
    data = _read_json(path) or {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data):
        raise TokenizerExportError(
            f"{path}: only byte-level BPE tokenizers (GPT-2/Llama 3/Qwen style) are supported from "
            f"tokenizer.json (this one is {model.get('type')!r}"
            f"{'' if _is_byte_level(data) else ', not byte-level'}); provide tokenizer.model for SentencePiece")
    id_to_tok = {int(i): (t, NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens") or []:
        id_to_tok[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    tokens, types = _fill_vocab(id_to_tok, vocab_size, path)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = bpe_pre if bpe_pre is not None else detect_bpe_pre(path)
    if not _PRE_NAME.match(pre):
        raise TokenizerExportError(f"--bpe-pre {pre!r} is not a pre-tokenizer name (e.g. gpt-2, llama-bpe, qwen2)")
    lookup = {t: i for i, (t, _) in id_to_tok.items()}
    add_bos, add_eos = _post_processor_adds(data.get("post_processor"))
    return Vocab(model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre,
                 special=_special_ids(tok_cfg, lookup),
                 add_bos=tok_cfg.get("add_bos_token", add_bos),
                 add_eos=tok_cfg.get("add_eos_token", add_eos))


def _is_byte_level(data: dict) -> bool:
    def has(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers") or node.get("decoders") or [])
    return has(data.get("pre_tokenizer")) or has(data.get("decoder"))


def detect_bpe_pre(tokenizer_json: Path) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from the probe-text hash."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(_PRE_PROBE).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    name = KNOWN_BPE_PRE.get(digest)
    if name is None:
        raise TokenizerExportError(
            f"{tokenizer_json}: unknown BPE pre-tokenizer (probe hash {digest[:16]}...): llama.cpp "
            "needs to know how this tokenizer splits text before BPE. Pass --bpe-pre NAME with "
            "the family whose splitting rules it uses, e.g. --bpe-pre gpt-2 (GPT-2 ByteLevel "
            "regex), llama-bpe (Llama 3), qwen2, smollm")
    return name


def _post_processor_adds(node) -> tuple[bool | None, bool | None]:
    """Whether tokenizer.json's post-processor puts a special token before/after the text."""
    if not isinstance(node, dict):
        return None, None
    if node.get("type") == "Sequence":
        for child in node.get("processors") or []:
            found = _post_processor_adds(child)
            if found != (None, None):
                return found
        return None, None
    if node.get("type") != "TemplateProcessing":
        return None, None
    single = node.get("single") or []
    def is_special(piece) -> bool:
        return isinstance(piece, dict) and "SpecialToken" in piece
    return bool(single) and is_special(single[0]), bool(single) and is_special(single[-1])


def _special_ids(tok_cfg: dict, lookup: dict[str, int]) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        text = _token_text(tok_cfg.get(f"{kind}_token"))
        if text is not None and text in lookup:
            ids[kind] = lookup[text]
    return ids


def _spm_vocab(path: Path, hf_dir: Path, tok_cfg: dict, vocab_size: int) -> Vocab | None:
    """SentencePiece vocab; None when tokenizer.model is not a SentencePiece model."""
    try:
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception:  # e.g. a tiktoken file named tokenizer.model: use tokenizer.json
        return None
    if not proto.pieces:
        return None
    id_to_tok = {i: (p.piece, int(p.type)) for i, p in enumerate(proto.pieces)}
    scores = {i: float(p.score) for i, p in enumerate(proto.pieces)}
    for i, text, special in _hf_added_tokens(hf_dir, tok_cfg):
        if i not in id_to_tok or id_to_tok[i][0] != text:
            id_to_tok[i] = (text, CONTROL if special else USER_DEFINED)
            scores[i] = -1000.0
    tokens, types = _fill_vocab(id_to_tok, vocab_size, path)
    lookup = {t: i for i, (t, _) in id_to_tok.items()}
    spec = proto.trainer_spec
    special = {k: v for k, v in (("bos", spec.bos_id), ("eos", spec.eos_id),
                                 ("unk", spec.unk_id), ("pad", spec.pad_id)) if v >= 0}
    special.update(_special_ids(tok_cfg, lookup))
    return Vocab(model="llama", tokens=tokens, types=types,
                 scores=[scores.get(i, -1000.0) for i in range(vocab_size)],
                 special=special, add_bos=tok_cfg.get("add_bos_token", True),
                 add_eos=tok_cfg.get("add_eos_token", False),
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


def _hf_added_tokens(hf_dir: Path, tok_cfg: dict) -> Iterator[tuple[int, str, bool]]:
    """(id, text, special) for tokens the HF tokenizer adds on top of the base model."""
    for i, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
        yield int(i), entry["content"], bool(entry.get("special"))
    data = _read_json(hf_dir / "tokenizer.json") or {}
    for entry in data.get("added_tokens") or []:
        yield int(entry["id"]), entry["content"], bool(entry.get("special"))


def _chat_template(hf_dir: Path, tok_cfg: dict) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if tmpl is None:
        tmpl = (_read_json(hf_dir / "chat_template.json") or {}).get("chat_template")
    return tmpl


# =======================================================================================
# Writing

# GGUF tensor type numbers (ggml_type)
_F32, _F16, _Q8_0, _BF16 = 0, 1, 8, 30
_CHUNK_ELEMS = 1 << 22  # convert in row chunks of ~4M values to bound temporaries


def tensor_type(t: PlannedTensor, outtype: str) -> int:
    """The GGUF type of one tensor: vectors stay f32 (as llama.cpp's converter does)."""
    if len(t.shape) < 2 or outtype == "f32":
        return _F32
    if outtype == "bf16":
        return _BF16
    if outtype == "q8_0":
        return _Q8_0 if t.shape[-1] % 32 == 0 else _F16   # rows must fill whole blocks
    return _F16


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    n = math.prod(shape)
    return {_F32: 4 * n, _F16: 2 * n, _BF16: 2 * n, _Q8_0: n // 32 * 34}[ggml_type]


def encode_tensor(t: PlannedTensor, ggml_type: int) -> np.ndarray:
    """Load, reorder for rope if needed, and convert one tensor to its GGUF bytes."""
    raw = t.load()
    if t.permute_heads:
        raw = permute_rows_for_rope(raw, t.permute_heads)
    if ggml_type == _BF16 and t.src_dtype == "BF16":
        return np.ascontiguousarray(raw)          # same bits, nothing to round
    rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
    out = np.empty(_out_row_shape(rows.shape, ggml_type), dtype=_out_dtype(ggml_type))
    step = max(1, _CHUNK_ELEMS // rows.shape[1])
    for lo in range(0, rows.shape[0], step):
        out[lo:lo + step] = _encode_rows(to_f32(rows[lo:lo + step], t.src_dtype), ggml_type)
    return out


def _out_dtype(ggml_type: int) -> type:
    return {_F32: np.float32, _F16: np.float16, _BF16: np.uint8, _Q8_0: np.uint8}[ggml_type]


def _out_row_shape(shape: tuple[int, int], ggml_type: int) -> tuple[int, int]:
    n_rows, n_cols = shape
    per_row = {_F32: n_cols, _F16: n_cols, _BF16: 2 * n_cols, _Q8_0: n_cols // 32 * 34}[ggml_type]
    return n_rows, per_row


def _encode_rows(x: np.ndarray, ggml_type: int) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    if ggml_type == _F32:
        return x
    if ggml_type == _F16:
        return x.astype(np.float16)
    return quants.quantize(x, GGMLQuantizationType(ggml_type))


def _add_hparams(w, spec: ModelSpec, name: str, outtype: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[outtype])
    w.add_quantization_version(_QUANT_VERSION)
    w.add_vocab_size(spec.vocab_size)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim * spec.n_head != spec.n_embd:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if spec.rope_type == "linear":
        from gguf import RopeScalingType
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(spec.rope["factor"]))


def _add_vocab(w, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre or "default")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id,
               "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
    for kind, token_id in vocab.special.items():
        setters[kind](token_id)
    if vocab.add_bos is not None:
        w.add_add_bos_token(bool(vocab.add_bos))
    if vocab.add_eos is not None:
        w.add_add_eos_token(bool(vocab.add_eos))
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def write_gguf(path: Path, spec: ModelSpec, vocab: Vocab, plan: list[PlannedTensor], outtype: str,
               name: str, progress: bool | None) -> list[str]:
    """Header and metadata first, then each tensor loaded, converted and written in turn.

    Returns warnings (tensors whose values overflowed f16).
    """
    import gguf

    writer = gguf.GGUFWriter(path, spec.arch)
    try:
        _add_hparams(writer, spec, name, outtype)
        _add_vocab(writer, vocab)
        types = [tensor_type(t, outtype) for t in plan]
        for t, ty in zip(plan, types):
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, ty),
                                   raw_dtype=gguf.GGMLQuantizationType(ty))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        warnings = []
        with Progress(len(plan), "gguf", unit="tensors", enabled=progress) as bar:
            for t, ty in zip(plan, types):
                data = encode_tensor(t, ty)
                if ty == _F16 and np.isinf(data).any():
                    warnings.append(f"{t.name}: values beyond the f16 range became inf (use bf16)")
                writer.write_tensor_data(data)
                del data
                bar.update(1, postfix=t.name)
    finally:
        writer.close()
    return warnings


def _quantize_with_llama_cpp(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp's quantiser failed (code {rc}) on {src}")


# =======================================================================================
# Entry points

def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16",
            bpe_pre: str | None = None, progress: bool | None = None) -> ConvertSummary:
    """Convert a Hugging Face checkpoint folder to one GGUF file; atomic on success.

    `progress`: None draws a bar only on a terminal, False never, True always.
    Raises UnsupportedArchitectureError, TokenizerExportError, CheckpointError (ExportError).
    """
    t0 = time.monotonic()
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: not a directory")
    # everything that can be wrong with the input is found before any output exists
    spec = model_spec(read_config(hf_dir))
    refs = index_checkpoint(hf_dir)
    plan = plan_tensors(spec, refs)
    vocab = load_vocab(hf_dir, spec.vocab_size, bpe_pre)
    name = hf_dir.resolve().name
    with atomic_path(out_path) as tmp:
        if outtype == "q4_k_m":
            warnings = _write_then_quantize(tmp, spec, vocab, plan, name, progress)
        else:
            warnings = write_gguf(tmp, spec, vocab, plan, outtype, name, progress)
    return ConvertSummary(
        path=out_path, arch=spec.arch, outtype=outtype, n_tensors=len(plan),
        n_bytes=out_path.stat().st_size, seconds=time.monotonic() - t0,
        n_params=sum(t.n_elements for t in plan), vocab_size=spec.vocab_size,
        tokenizer=vocab.model, bpe_pre=vocab.pre, warnings=warnings)


def _write_then_quantize(tmp: Path, spec: ModelSpec, vocab: Vocab, plan: list[PlannedTensor],
                         name: str, progress: bool | None) -> list[str]:
    # bf16 sources go through bf16 (f16 could overflow), anything else through f16
    mid_type = "bf16" if any(t.src_dtype == "BF16" for t in plan) else "f16"
    fd, mid = tempfile.mkstemp(prefix=f".{tmp.name}.", suffix=f".{mid_type}.tmp", dir=tmp.parent)
    os.close(fd)
    try:
        warnings = write_gguf(Path(mid), spec, vocab, plan, mid_type, name, progress)
        _quantize_with_llama_cpp(Path(mid), tmp, _FILE_TYPE["q4_k_m"])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mid)
    return warnings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face checkpoint folder")
    parser.add_argument("--out", required=True, metavar="FILE.gguf", help="output GGUF file")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16",
                        help="tensor type; default f16. q4_k_m goes through llama.cpp's quantiser "
                             "and needs room for an f16/bf16 intermediate beside the output")
    parser.add_argument("--bpe-pre", metavar="NAME", default=None,
                        help="llama.cpp BPE pre-tokenizer name when auto-detection does not know the "
                             "tokenizer (e.g. gpt-2, llama-bpe, qwen2, smollm)")
    parser.add_argument("--no-progress", action="store_true", help="never draw the progress bar")


def run(args: argparse.Namespace) -> int:
    # SIGTERM becomes SystemExit so the temporary output file is removed on the way out
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        summary = convert(args.hf, args.out, outtype=args.outtype, bpe_pre=args.bpe_pre,
                          progress=False if args.no_progress else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary)
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
