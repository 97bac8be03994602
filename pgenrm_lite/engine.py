"""A GGUF model on llama.cpp that samples N seeded continuations of several prompts at once.

Knows nothing of P-GenRM. It loads a model, turns chat messages into tokens (template
text may hold special tokens, message content never does), and decodes every requested
sample in one batch per step: each distinct prompt is evaluated once, reusing the longest
prefix it shares with an earlier prompt, and its KV cells are shared with its samples by
sequence copy. Each sample has its own seeded sampler chain (and grammar, if given).

A request may name a cacheable prefix (`prefix_len`, e.g. a chat's system message). Such a
prefix is always evaluated the same way: alone, from an empty memory, into sequence 0 at
positions 0..P-1, in n_batch spans; its sequence state is then saved, and restored into the
request's sequence before the rest of the prompt is evaluated from position P. A warm
`PrefixCache` skips the evaluation and restores the saved bytes, so the cells, their values
and every later batch are the same whether the cache was cold, warm or filled by other calls:
the same seed gives bitwise the same samples.

The parts follow llama.cpp's own seams: `llama_model` (weights, vocabulary, chat template),
`llama_context` (KV memory and batch), `llama_sampler` (one sequence's chain and grammar),
`batched` (a call's prompt layout and decode loop) and `digit_readout` (per-call digit
distributions); `generation` holds the request and result types re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._llama import llama_cpp
from .batched import GroupRun, PrefixStates, plan_groups
from .digit_readout import DigitReadout
from .errors import ClosedError, ConfigError, ContextOverflowError
from .generation import Completion, GenerationStats, Request, SamplingParams, common_prefix, prompt_cells
from .llama_context import LlamaContext
from .llama_model import DEVICES, LlamaModel, model_stat_id, resolve_device
from .llama_sampler import Grammar, VocabArray
from .prefix_cache import PrefixCache

__all__ = ["DEVICES", "Completion", "Engine", "GenerationStats", "Request", "SamplingParams", "common_prefix"]


class Engine:
    """A loaded GGUF model and one llama.cpp context sized for batched sampling.

    The model (`model`: weights, vocabulary, chat template) and the context (`context`: KV memory
    and batch) each own and free their native pointers; samplers and grammars are owned per sample.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 8192, n_threads: int | None = None,
                 device: str = "auto", n_batch: int = 512, n_seq_max: int = 64,
                 flash_attn: bool = True, kv_unified: bool = True, verbose: bool = False,
                 chat_template: str | None = None, prefix_cache: PrefixCache | None = None,
                 model_id: str | None = None):
        """`model_id` names the model file's content (its sha256) in prefix-cache keys; without
        it the file is hashed when a cache first needs the key."""
        if device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
        if n_ctx < 64:
            raise ConfigError(f"n_ctx={n_ctx} is too small; use at least 64 (typically 4096-16384)")
        if not 1 <= n_seq_max <= 256:
            raise ConfigError(f"n_seq_max must be in 1..256 (llama.cpp's limit), got {n_seq_max}")
        if verbose:
            logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG)
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.model = model = LlamaModel(self.model_path, device=self.device, chat_template=chat_template)
        try:
            self.context = context = LlamaContext(model, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max,
                                                  n_threads=self.n_threads, kv_unified=kv_unified,
                                                  flash_attn=flash_attn)
        except BaseException:
            model.close()
            raise
        self.n_vocab, self.n_ctx_train = model.n_vocab, model.n_ctx_train
        self.chat_template, self.architecture = model.chat_template, model.architecture
        self.n_ctx, self.n_batch, self.n_ctx_seq = context.n_ctx, context.n_batch, context.n_ctx_seq
        self.n_seq_max, self.kv_unified = n_seq_max, kv_unified
        self._vocab_scratch = VocabArray(self.n_vocab)  # candidates of a grammar-masked draw or a probe
        self.prefix_cache = prefix_cache
        self._model_id = model_id
        self._flash_attn = flash_attn
        self._cache_scope: tuple | None = None
        self._cache_scope_hashed = False

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the context, then the model. Closing twice is harmless."""
        if getattr(self, "context", None) is not None:
            self.context.close()
        if getattr(self, "model", None) is not None:
            self.model.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_open(self) -> None:
        # llama.cpp aborts the process on a freed model or context; refuse first.
        if not (getattr(self, "context", None) and self.context.is_open and self.model.is_open):
            raise ClosedError("this engine was closed; load the model again")

    # -- tokens and chat ---------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def is_control(self, token: int) -> bool:
        """A control token: one that only template text (parse_special) can produce."""
        return self.model.is_control(token)

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        self._require_open()
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", "replace")

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        self._require_open()
        return self.model.token_bytes(token, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def chat_tokens(self, messages: Sequence[dict]) -> tuple[int, ...]:
        """Prompt tokens for chat messages, ending with the assistant's generation prompt."""
        self._require_open()
        return self.model.chat_tokens(messages)

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The chat template's output as one string (what transformers' apply_chat_template writes)."""
        return self.model.render_chat(messages)

    def cacheable_prefix(self, a: Sequence[int], b: Sequence[int]) -> int:
        """Tokens of a cacheable prefix two prompts share: their common prefix, cut after its last
        control token. Text between control tokens is tokenized as one run (see chat), so a cut
        there is where other prompts with the same head (e.g. system message) split too."""
        n = min(common_prefix(a, b), len(a) - 1, len(b) - 1)
        while n > 0 and not self.is_control(a[n - 1]):
            n -= 1
        return n

    def grammar_accepts(self, grammar: str, text: str) -> bool:
        """Whether `grammar` lets this model write `text` (as this vocabulary tokenizes it) and then stop."""
        self._require_open()
        g = Grammar.compile(self.model.vocab, grammar)
        try:
            for token in self.tokenize(text) + [self.model.eos]:
                if not g.allows(token):
                    return False
                g.accept(token)
            return True
        finally:
            g.close()

    # -- generation ------------------------------------------------------------------

    def tokens_needed(self, requests: Sequence[Request], max_tokens: int) -> int:
        """KV cells the requests take together: shared prompt prefixes once, plus every sample's budget."""
        return prompt_cells(requests) + sum(len(r.seeds) for r in requests) * max_tokens

    def generate(self, requests: Sequence[Request], params: SamplingParams
                 ) -> tuple[list[list[Completion]], GenerationStats]:
        """Draw `len(r.seeds)` samples from each request; results keep the requests' order.

        Samples are decoded together (see `batched`); if they do not all fit the context (or
        n_seq_max), they run in groups, and `stats.n_groups` says how many.
        """
        self._require_open()
        self._check(requests, params)
        readout = (DigitReadout(self.model, self.context, params.temperature, self._vocab_scratch)
                   if params.digit_probs else None)
        self._check_layout(requests)
        stats = GenerationStats()
        results: list[list[Completion | None]] = [[None] * len(r.seeds) for r in requests]
        prefixes = PrefixStates(self.context, self.prefix_cache, self.cache_scope)
        evicted = self.prefix_cache.stats.evicted if self.prefix_cache is not None else 0
        for group in plan_groups(requests, params.max_tokens, n_ctx=self.n_ctx, n_seq_max=self.n_seq_max,
                                 kv_unified=self.kv_unified, reserve=int(params.digit_probs)):
            stats.n_groups += 1
            GroupRun(self.model, self.context, params, self._vocab_scratch, readout, prefixes).run(
                requests, group, results, stats)
        if self.prefix_cache is not None:
            stats.cache_evicted = self.prefix_cache.stats.evicted - evicted
        if stats.n_groups > 1:
            stats.notes.append(f"samples ran in {stats.n_groups} groups: they did not fit "
                               f"n_ctx={self.n_ctx} / n_seq_max={self.n_seq_max} together")
        return [[c for c in row if c is not None] for row in results], stats  # type: ignore[misc]

    def _check(self, requests: Sequence[Request], params: SamplingParams) -> None:
        if params.max_tokens < 1:
            raise ConfigError("max_tokens must be at least 1")
        if params.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 means greedy)")
        for r in requests:
            if not r.tokens:
                raise ConfigError("a request has an empty prompt")
            need = len(r.tokens) + params.max_tokens
            if need > self.n_ctx_seq:
                raise ContextOverflowError(
                    f"a prompt of {len(r.tokens)} tokens plus max_tokens={params.max_tokens} needs "
                    f"{need} tokens but a sequence can hold {self.n_ctx_seq}; shorten the input, lower "
                    "max_tokens or load with a larger n_ctx",
                    n_prompt_tokens=len(r.tokens), max_tokens=params.max_tokens, n_ctx=self.n_ctx_seq)

    @staticmethod
    def _check_layout(requests: Sequence[Request]) -> None:
        for r in requests:
            if not 0 <= r.prefix_len < len(r.tokens):
                raise ConfigError(f"prefix_len={r.prefix_len} must leave at least one of the prompt's "
                                  f"{len(r.tokens)} tokens to evaluate")
            if r.shared_len and not (r.prefix_len and r.prefix_len <= r.shared_len < len(r.tokens)):
                raise ConfigError(f"shared_len={r.shared_len} needs a cacheable prefix (prefix_len="
                                  f"{r.prefix_len}) no longer than it, and must leave at least one of the "
                                  f"prompt's {len(r.tokens)} tokens to evaluate")

    def cache_scope(self, *, hash_file: bool = True) -> tuple:
        """Everything besides the prefix tokens that decides a saved prefix state's bytes.

        The model is named by `model_id` when given; else, for keys that outlive this process
        (`hash_file`), by the file's sha256, and for memory-only keys by its path, size and mtime.
        """
        if self._cache_scope is None or (hash_file and not self._cache_scope_hashed):
            model_id = self._model_id
            if model_id is None and hash_file:
                from .bundle import sha256_file

                model_id = sha256_file(Path(self.model_path))
            elif model_id is None:
                model_id = model_stat_id(self.model_path)
            self._cache_scope_hashed = hash_file or self._model_id is not None
            build = f"{llama_cpp.__version__} {llama_cpp.llama_print_system_info().decode('utf-8', 'replace')}"
            self._cache_scope = (model_id, build, self.device, self.n_ctx, self.n_batch, self.n_seq_max,
                                 self.kv_unified, self._flash_attn, self.n_threads, self.chat_template or "")
        return self._cache_scope

    def prompt_logprobs(self, tokens: Sequence[int]) -> Iterator[np.ndarray]:
        """Next-token log-probabilities after every prefix of `tokens`, one [n, n_vocab] float32 array
        per batch of up to n_batch positions (so a long prompt never holds all its rows at once).

        Uses sequence 0 from an empty memory; what a `generate` call left there is cleared."""
        self._require_open()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ConfigError("no tokens to evaluate")
        if len(tokens) > self.n_ctx_seq:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx_seq} per sequence; "
                                       "load the model with a larger n_ctx", n_prompt_tokens=len(tokens),
                                       max_tokens=0, n_ctx=self.n_ctx_seq)
        if min(tokens) < 0 or max(tokens) >= self.n_vocab:
            raise ConfigError(f"token ids must be in 0..{self.n_vocab - 1}")
        ctx = self.context
        ctx.clear()
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            ctx.decode([(t, start + i, 0, True) for i, t in enumerate(chunk)])
            rows = ctx.all_logits(len(chunk))
            rows = rows.astype(np.float32) - rows.max(axis=1, keepdims=True)
            yield rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        ctx.clear()
