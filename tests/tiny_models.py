"""Tiny random Hugging Face checkpoints for tests: real architectures, real tokenizers.

Plain functions, no pytest fixtures, so tests, conftest and benchmarks can all call them.
The tokenizers are trained here, on the text below, so nothing is downloaded.
Heavy imports (torch, transformers, tokenizers, sentencepiece) happen inside the functions.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

# Training text for the tiny tokenizers: prose, chat turns, numbers, code, some unicode.
CORPUS = """\
The user prefers short answers with concrete examples and no filler.
A meticulous analyst reads the preference history before scoring each response.
Response 1 explains the idea clearly; Response 2 rambles and repeats itself.
Criteria: clarity (40%), accuracy (35%), tone (25%). Weighted score: 7.5 out of 10.
She asked for a recipe with 3 eggs, 200 g of flour and 1.5 cups of milk.
He wanted the weather in Paris for 12/05/2024 at 09:30, not a history lesson.
Prices rose 3.2% in 2023 and 4.1% in 2022; the budget was $1,250,000.
I've been told he's there. You're sure? We'll see. They'd like some tea, wouldn't they?
def score(response: str, weights: dict[str, float]) -> float:
    return sum(w * rate(response, name) for name, w in weights.items())
for i in range(10):
    print(i, i * i)
{"better_response": {"response_1": 8.5, "response_2": 6.0}}
<JSON_START>{"rationale": "clear and brief"}<JSON_END>
User: How do I sort a list in Python?
Chosen: Use sorted(items) or items.sort() for in-place sorting.
Rejected: Sorting is a fundamental concept in computer science with a long history.
User: Write a haiku about autumn.
Chosen: Crimson leaves drifting / quiet rivers carry them / the year exhales slow.
Rejected: Autumn is a season. Leaves fall. It is cold.
Café au lait, naïve façade, résumé, crème brûlée, jalapeño, Zürich, smörgåsbord.
Привет, как дела? Всё хорошо, спасибо. Δοκιμή ελληνικού κειμένου.
我想在苹果工作。今天天气很好。日本語のテキストも少し。한국어 문장도 있습니다.
Emoji: 🚀 ✅ 😀 🦙 — dashes – and “quotes” and ‘single’ ones… ellipsis.
Tabs\tand  double  spaces   and    more     spaces.
Line one
Line two

Line four after a blank line.
   indented text with leading spaces
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! the quick brown fox?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 65536 3.14159 2.71828 -7 +12 1e-3.
Email me at someone@example.com or visit https://example.org/path?q=1&r=2.
Markdown: **bold**, _italic_, `code`, # Heading, - bullet, 1. numbered.
A good answer states the result first, then the reasoning, then any caveats.
Users who value brevity dislike long introductions; users who value depth want detail.
The assistant should be honest, helpful and harmless, and avoid making things up.
Persona: a busy engineer who likes bullet points, exact numbers and working code.
Scenario: travel planning. Criteria: cost awareness, practicality, local knowledge.
Scenario: creative writing. Criteria: originality, imagery, rhythm, emotional effect.
Scenario: coding help. Criteria: correctness, minimal example, explanation of errors.
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHS = ("llama", "qwen2", "qwen3")


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- tokenizers

def train_bpe_tokenizer(vocab_size: int = 512, *, add_bos: bool = True):
    """A byte-level BPE (GPT-2 style, no prefix space) trained on CORPUS; a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: llama.cpp's byte-level BPE never inserts a leading space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_lines() * 4, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_spm_model(vocab_size: int = 600) -> bytes:
    """A SentencePiece BPE model (serialized) with byte fallback and the ChatML markers.

    Identity normalisation and kept whitespace, so llama.cpp's SPM tokenizer (which does
    not normalise) can match it exactly.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return buf.getvalue()


def _save_bpe_tokenizer(out_dir: Path, add_bos: bool) -> int:
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe_tokenizer(add_bos=add_bos)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token=None,
        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "</s>"])
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    _patch_tokenizer_config(out_dir, add_bos_token=add_bos)
    return tok.get_vocab_size()


def _save_spm_tokenizer(out_dir: Path) -> int:
    from transformers import AutoTokenizer

    model = train_spm_model()
    staging = out_dir / "_spm_staging"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "tokenizer.model").write_bytes(model)
    (staging / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "add_prefix_space": True}))
    # DESIGN.md 7: LlamaTokenizer(vocab_file=...) silently gives a 3-token vocab in
    # transformers 5; from_pretrained on a folder holding tokenizer.model works.
    hf_tok = AutoTokenizer.from_pretrained(staging)
    n_vocab = len(hf_tok)
    if n_vocab < 100:
        raise RuntimeError(f"SentencePiece tokenizer loaded with only {n_vocab} tokens")
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    shutil.copyfile(staging / "tokenizer.model", out_dir / "tokenizer.model")
    shutil.rmtree(staging)
    _patch_tokenizer_config(out_dir, add_bos_token=True)
    return n_vocab


def _patch_tokenizer_config(out_dir: Path, **entries: Any) -> None:
    """Make add_bos_token and the chat template explicit, whatever transformers wrote."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg.update(entries)
    cfg["chat_template"] = CHATML_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------- models

def _config(arch: str, vocab_size: int, overrides: dict[str, Any]):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=None, eos_token_id=None)
    if arch == "llama":
        common["rope_scaling"] = {  # llama3 scaling with every frequency band in use
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        common["rope_theta"] = 10000.0
        common.update(overrides)
        return LlamaConfig(**common)
    if arch == "qwen2":
        common.update(tie_word_embeddings=True, rope_theta=1000000.0)
        common.update(overrides)
        return Qwen2Config(**common)
    if arch == "qwen3":
        common.update(head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0)
        common.update(overrides)
        return Qwen3Config(**common)
    raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")


def _randomise_small_params(model, seed: int) -> None:
    """Norm weights and biases start as 1 and 0: make them random so a misplaced one shows."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_((1.0 + noise) if "norm" in name else noise)


def build_tiny_checkpoint(out_dir: str | Path, arch: str = "llama", *, tokenizer: str = "bpe",
                          seed: int = 0, max_shard_size: str | None = None,
                          **config_overrides: Any) -> Path:
    """Write a tiny random `arch` checkpoint with a trained tokenizer into `out_dir`.

    llama: GQA and llama3 rope scaling, BOS added; qwen2: tied embeddings and attention
    biases, vocab padded past the tokenizer; qwen3: q/k norms and head_dim != hidden/heads.
    `tokenizer` is "bpe" (byte-level BPE, tokenizer.json) or "spm" (tokenizer.model).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        n_tok = _save_bpe_tokenizer(out_dir, add_bos=(arch == "llama"))
    elif tokenizer == "spm":
        n_tok = _save_spm_tokenizer(out_dir)
    else:
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', not {tokenizer!r}")
    ids = _special_ids(out_dir)
    # qwen2 pads its embedding past the tokenizer (as real Qwen checkpoints do)
    vocab_size = n_tok // 64 * 64 + 64 if arch == "qwen2" else n_tok
    overrides = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
                 "pad_token_id": ids.get("pad"), **config_overrides}
    config = _config(arch, overrides.pop("vocab_size", vocab_size), overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_small_params(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def _special_ids(out_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    found = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    return {k: v for k, v in found.items() if v is not None}


def _ensure_repo_on_path() -> None:
    # `export/` is not an installed package: make the checkout importable when run from tests/
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)


def _cached_gguf(cache_dir: str | Path, stem: str, build_checkpoint, outtype: str, bpe_pre: str | None) -> Path:
    """`cache_dir/STEM-OUTTYPE.gguf`, converted (once) from `cache_dir/STEM-hf`, built (once) by `build_checkpoint(dir)`."""
    _ensure_repo_on_path()
    from export.gguf_convert import convert

    cache_dir = Path(cache_dir)
    out = cache_dir / f"{stem}-{outtype}.gguf"
    if out.exists():
        return out
    hf_dir = cache_dir / f"{stem}-hf"
    if not (hf_dir / "config.json").exists():
        build_checkpoint(hf_dir)
    convert(hf_dir, out, outtype=outtype, bpe_pre=bpe_pre, progress=False)
    return out


def build_tiny_gguf(cache_dir: str | Path, arch: str = "llama", outtype: str = "f32", *,
                    tokenizer: str = "bpe") -> Path:
    """Build (once) a tiny checkpoint and its GGUF under `cache_dir`; return the GGUF path."""
    # the tokenizers-trained BPE has no known pre-tokenizer hash: GPT-2 rules match its setup
    return _cached_gguf(cache_dir, f"tiny-{arch}-{tokenizer}",
                        lambda d: build_tiny_checkpoint(d, arch, tokenizer=tokenizer), outtype,
                        "gpt-2" if tokenizer == "bpe" else None)


# ----------------------------------------------------------------------------- real tokenizers

# Real tokenizers with their chat templates (scripts/fetch_tokenizers.sh puts them here):
# name -> (architecture to pair them with, or None for rendering tests only).
REAL_TOKENIZERS = {"llama3_1": "llama", "qwen3": "qwen3", "gemma3": None}


def real_tokenizer_dir(name: str) -> Path:
    import os

    root = Path(os.environ.get("PGENRM_TOKENIZERS") or Path.home() / ".cache" / "pgenrm-lite" / "tokenizers")
    return root / name


def build_real_tokenizer_checkpoint(out_dir: str | Path, name: str, *, seed: int = 0) -> Path:
    """A tiny random checkpoint of the real architecture around a real tokenizer (its full vocabulary).

    llama3_1: Llama with the 128,256-token Llama 3.1 vocabulary, llama3 rope scaling, GQA;
    qwen3: Qwen3 with q/k norms and the Qwen3 vocabulary. The tokenizer files and chat
    template are the real ones, copied unchanged.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, arch = real_tokenizer_dir(name), REAL_TOKENIZERS[name]
    if arch is None:
        raise ValueError(f"{name} is for rendering tests only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / f, out_dir / f)
    tok = AutoTokenizer.from_pretrained(out_dir)
    overrides: dict[str, Any] = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                 "pad_token_id": tok.pad_token_id}
    if arch == "llama":  # Llama 3.1's own rope settings, on a short context
        overrides.update(rope_theta=500000.0, max_position_embeddings=8192, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024})
    else:
        overrides.update(tie_word_embeddings=True, max_position_embeddings=8192)
    config = _config(arch, len(tok), overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_small_params(model, seed)
    model.save_pretrained(out_dir)
    return out_dir


def build_real_tokenizer_gguf(cache_dir: str | Path, name: str, outtype: str = "f32") -> Path:
    """Build (once) `build_real_tokenizer_checkpoint` and its GGUF (pre-tokenizer detected, not forced)."""
    return _cached_gguf(cache_dir, f"real-{name}", lambda d: build_real_tokenizer_checkpoint(d, name), outtype, None)
