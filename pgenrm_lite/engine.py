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
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

# llama.cpp's CPU backend (built with OpenMP) spins idle worker threads by default. On cores
# shared with other busy processes that turns each decode step into a wait for a descheduled
# spinner: one SmolLM2 compare took 344 s with 2 spinning threads and 9 s with passive ones
# (2 cores, load average 4). Passive waiting is the default here; a caller's own setting wins.
# It must be set before llama.cpp's library (and with it libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from .chat import ChatFormatter
from .errors import ClosedError, ConfigError, ContextOverflowError, EngineError
from .prefix_cache import PrefixCache, cache_key

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Request:
    """One prompt (already tokenized) and the seeds of the samples to draw from it."""

    tokens: tuple[int, ...]
    seeds: tuple[int, ...]
    # The first prefix_len tokens are evaluated (or restored from the prefix cache) as their
    # own span; 0: no cacheable prefix, the prompt shares prefixes with earlier ones as found.
    prefix_len: int = 0
    # Whose text the prefix holds (a user id), so a prefix cache can forget it; "" for nobody.
    owner: str = ""
    # With a cacheable prefix: the first shared_len tokens (>= prefix_len) are ones other prompts
    # of the same call may share (e.g. the user's query, which both candidate orders hold). They
    # are evaluated once per group as their own span after the prefix (a later request with the
    # same first shared_len tokens copies those cells), so like the prefix, the layout is decided
    # by the call's requests alone, never by the cache. 0: no such span.
    shared_len: int = 0


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of generation) or "length" (max_tokens reached)
    seed: int
    # With SamplingParams.digit_probs: for each generated digit, its character offset in
    # `text` and the sampling distribution over "0".."9" at that step (grammar applied).
    digit_probs: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # At the first digit of a number, where "1" could open "10": P(the next token is "0" | "1").
    ten_probs: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationStats:
    prompt_s: float = 0.0
    decode_s: float = 0.0
    n_prompt_tokens: int = 0  # tokens actually evaluated (shared prefixes counted once)
    n_generated_tokens: int = 0
    n_groups: int = 0  # >1 when the samples did not fit the context together
    notes: list[str] = field(default_factory=list)
    n_cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of evaluated
    cache_hits: int = 0  # distinct prefixes restored from the cache
    cache_misses: int = 0  # distinct prefixes evaluated
    cache_evicted: int = 0  # cache entries dropped during the call to stay within the budget


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    grammar: str | None = None
    digit_probs: bool = False  # record the digit distribution wherever a digit is drawn


class _Sample:
    """Decoding state of one sequence."""

    __slots__ = ("seq", "seed", "chain", "grammar", "pos", "tokens", "pieces", "done", "finish", "next_token",
                 "digits", "tens")

    def __init__(self, seq: int, seed: int, chain, grammar, pos: int):
        self.seq = seq
        self.seed = seed
        self.chain = chain
        self.grammar = grammar
        self.pos = pos
        self.tokens: list[int] = []
        self.pieces: list[bytes] = []
        self.done = False
        self.finish = "length"
        self.next_token = -1
        self.digits: dict[int, tuple[float, ...]] = {}  # token index -> digit distribution
        self.tens: dict[int, float] = {}  # token index -> P("0" after a "1" here)


class Engine:
    """A loaded GGUF model and one llama.cpp context sized for batched sampling."""

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
        gpu_ok = bool(llama_cpp.llama_supports_gpu_offload())
        if device == "gpu" and not gpu_ok:
            if "CUDA :" in llama_cpp.llama_print_system_info().decode("utf-8", "replace"):
                raise ConfigError("device='gpu' was requested; this llama-cpp-python build has CUDA but found no "
                                  "usable GPU (no NVIDIA driver, or one older than the CUDA runtime it was built "
                                  "with); check `nvidia-smi`, or use device='cpu' / 'auto'")
            raise ConfigError("device='gpu' was requested but this llama-cpp-python build has no GPU "
                              "offload; rebuild it with `bash scripts/setup.sh --cuda` "
                              "(or CMAKE_ARGS for Metal/Vulkan), "
                              "or use device='cpu' / 'auto'")
        self.device = "gpu" if (device in ("gpu", "auto") and gpu_ok) else "cpu"
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = -1 if self.device == "gpu" else 0
        mparams.use_mmap = True
        model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), mparams)
        if not model:
            raise EngineError(f"llama.cpp could not load {self.model_path}: the file is not a GGUF "
                              "model this build supports (re-export it with `python -m export gguf`)")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        # Unified: one KV pool shared by all sequences, so copied prompt cells are stored once,
        # but every sequence's attention steps over every cell in use (other sequences' cells
        # are masked, not skipped for free). Split: each sequence owns n_ctx / n_seq_max cells
        # and attends over its own only; prompts are copied per sequence (more memory).
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for "
                              f"{self.model_path}; lower n_ctx or n_seq_max")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_batch = llama_cpp.llama_n_batch(ctx)  # llama.cpp clamps it to n_ctx: a larger chunk would abort
        self.n_seq_max = n_seq_max
        self.kv_unified = kv_unified
        # Cells one sequence can hold: the whole context, or its own stream.
        self.n_ctx_seq = self.n_ctx if kv_unified else self.n_ctx // n_seq_max
        self._batch = llama_cpp.llama_batch_init(max(n_batch, n_seq_max), 0, n_seq_max)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._one = _TokenArray(1)
        self._full = _TokenArray(self.n_vocab)
        self._all_ids = np.arange(self.n_vocab, dtype=np.int32)
        self._want_digits = False
        self._digit_ids: np.ndarray | None = None
        self._digit_of: dict[int, int] = {}
        self._probes: list = []
        # An override wins over the template the GGUF file carries (e.g. a file without one).
        self.chat_template = chat_template or self._meta("tokenizer.chat_template")
        self.architecture = self._meta("general.architecture") or "unknown"
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        self._bos_id = bos if (bos >= 0 and llama_cpp.llama_vocab_get_add_bos(self._vocab)) else None
        self._chat = ChatFormatter(
            self.chat_template,
            bos_token=self.token_bytes(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self.token_bytes(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "")
        self.prefix_cache = prefix_cache
        self._model_id = model_id
        self._flash_attn = flash_attn
        self._cache_scope: tuple | None = None
        self._cache_scope_hashed = False

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- model facts -----------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        size = 1 << 16
        for _ in range(3):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1
        return None

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- tokens ----------------------------------------------------------------------

    def _require_open(self) -> None:
        # llama.cpp aborts the process on a freed model or context; refuse first.
        if not getattr(self, "_ctx", None) or not getattr(self, "_model", None):
            raise ClosedError("this engine was closed; load the model again")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        self._require_open()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError("llama.cpp failed to tokenize the prompt")
        return list(buf[:n])

    def chat_tokens(self, messages: Sequence[dict]) -> tuple[int, ...]:
        """Prompt tokens for chat messages, ending with the assistant's generation prompt."""
        return tuple(self._chat.tokenize(messages, self.tokenize, is_control=self.is_control,
                                         token_text=self.token_text, bos_id=self._bos_id))

    def cacheable_prefix(self, a: Sequence[int], b: Sequence[int]) -> int:
        """Tokens of a cacheable prefix two prompts share: their common prefix, cut after its last
        control token. Text between control tokens is tokenized as one run (see chat), so a cut
        there is where other prompts with the same head (e.g. system message) split too."""
        n = min(common_prefix(a, b), len(a) - 1, len(b) - 1)
        while n > 0 and not self.is_control(a[n - 1]):
            n -= 1
        return n

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The chat template's output as one string (what transformers' apply_chat_template writes)."""
        return self._chat.render(self._chat.fit_roles(messages))

    def is_control(self, token: int) -> bool:
        """A control token: one that only template text (parse_special) can produce."""
        return bool(llama_cpp.llama_vocab_is_control(self._vocab, token))

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", "replace")

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        self._require_open()
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # -- generation ------------------------------------------------------------------

    def tokens_needed(self, requests: Sequence[Request], max_tokens: int) -> int:
        """KV cells the requests take together: shared prompt prefixes once, plus every sample's budget."""
        return _prompt_cells(requests) + sum(len(r.seeds) for r in requests) * max_tokens

    def generate(self, requests: Sequence[Request], params: SamplingParams
                 ) -> tuple[list[list[Completion]], GenerationStats]:
        """Draw `len(r.seeds)` samples from each request; results keep the requests' order.

        Samples are decoded together; if they do not all fit the context (or n_seq_max),
        they run in groups, and `stats.n_groups` says how many.
        """
        self._require_open()
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
        self._prepare_digits(params)
        stats = GenerationStats()
        results: list[list[Completion | None]] = [[None] * len(r.seeds) for r in requests]
        for r in requests:
            if not 0 <= r.prefix_len < len(r.tokens):
                raise ConfigError(f"prefix_len={r.prefix_len} must leave at least one of the prompt's "
                                  f"{len(r.tokens)} tokens to evaluate")
            if r.shared_len and not (r.prefix_len and r.prefix_len <= r.shared_len < len(r.tokens)):
                raise ConfigError(f"shared_len={r.shared_len} needs a cacheable prefix (prefix_len="
                                  f"{r.prefix_len}) no longer than it, and must leave at least one of the "
                                  f"prompt's {len(r.tokens)} tokens to evaluate")
        states: dict[tuple[int, ...], bytes] = {}  # this call's prefix states, by prefix tokens
        evicted = self.prefix_cache.stats.evicted if self.prefix_cache is not None else 0
        for group in self._plan_groups(requests, params.max_tokens, reserve=int(params.digit_probs)):
            stats.n_groups += 1
            self._run_group(requests, group, params, results, stats, states)
        if self.prefix_cache is not None:
            stats.cache_evicted = self.prefix_cache.stats.evicted - evicted
        if stats.n_groups > 1:
            stats.notes.append(f"samples ran in {stats.n_groups} groups: they did not fit "
                               f"n_ctx={self.n_ctx} / n_seq_max={self.n_seq_max} together")
        return [[c for c in row if c is not None] for row in results], stats  # type: ignore[misc]

    def _plan_groups(self, requests: Sequence[Request], max_tokens: int,
                     reserve: int = 0) -> list[list[tuple[int, int]]]:
        """Split (request, sample) pairs into groups that fit the KV cache and the sequence limit.

        `reserve` sequences (and cells) are kept free for the digit read-out's probes.
        """
        groups: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        current_reqs: dict[int, Request] = {}
        for ri, req in enumerate(requests):
            for si in range(len(req.seeds)):
                trial = dict(current_reqs)
                trial[ri] = req
                # Split KV: each sample has its own stream, already checked to fit; only the count limits.
                cells = (_prompt_cells(list(trial.values())) + (len(current) + 1) * max_tokens + reserve
                         if self.kv_unified else 0)
                if current and (cells > self.n_ctx or len(current) + 1 > self.n_seq_max - reserve):
                    groups.append(current)
                    current, current_reqs = [], {}
                current.append((ri, si))
                current_reqs[ri] = req
        if current:
            groups.append(current)
        return groups

    def _run_group(self, requests, group, params, results, stats, states) -> None:
        # Which samples each request owns in this group; the first one's sequence holds the prompt.
        by_req: dict[int, list[int]] = {}
        for ri, si in group:
            by_req.setdefault(ri, []).append(si)
        samples: dict[tuple[int, int], _Sample] = {}
        seq_ids = iter(range(self.n_seq_max))
        evaluated: list[tuple[int, tuple[int, ...]]] = []  # (seq, tokens) of prompts already in cache
        placed: dict[tuple[int, ...], int] = {}  # cacheable prefix -> the sequence holding it in this group
        shared: dict[tuple[int, ...], int] = {}  # a call-shared span's tokens -> the sequence holding them
        try:
            t0 = time.perf_counter()
            for ri in by_req:
                self._prefix_state(requests[ri], states, stats)
            llama_cpp.llama_memory_clear(self._mem, True)
            for ri, sis in by_req.items():
                tokens = requests[ri].tokens
                seqs = [next(seq_ids) for _ in sis]
                owner = seqs[0]
                p, q = requests[ri].prefix_len, requests[ri].shared_len
                if q and tokens[:q] in shared:
                    self._copy_prefix(shared[tokens[:q]], owner, q)
                    stats.n_prompt_tokens += self._eval_span(owner, tokens, q, logits_last=True)
                elif p:
                    prefix = tokens[:p]
                    if prefix in placed:
                        self._copy_prefix(placed[prefix], owner, p)
                    else:
                        self._restore(states[prefix], owner)
                        placed[prefix] = owner
                    if q:
                        stats.n_prompt_tokens += self._eval_span(owner, tokens[:q], p, logits_last=False)
                        shared[tokens[:q]] = owner
                    stats.n_prompt_tokens += self._eval_span(owner, tokens, max(p, q), logits_last=True)
                else:
                    stats.n_prompt_tokens += self._prefill(owner, tokens, evaluated)
                evaluated.append((owner, tokens))
                for seq in seqs[1:]:
                    llama_cpp.llama_memory_seq_cp(self._mem, owner, seq, -1, -1)
                # First token of every sample comes from the prompt's last logits (batch row n-1).
                last_row = self._batch.n_tokens - 1
                for si, seq in zip(sis, seqs):
                    seed = requests[ri].seeds[si]
                    s = _Sample(seq, seed, self._make_chain(seed, params), self._make_grammar(params), len(tokens))
                    samples[(ri, si)] = s
                    self._accept(s, self._sample(s, last_row), params)
                self._run_probes()  # before the next prompt's batch overwrites these logits
            t1 = time.perf_counter()
            stats.prompt_s += t1 - t0
            self._decode_loop(list(samples.values()), params)
            stats.decode_s += time.perf_counter() - t1
        finally:
            for _, _, grammar in self._probes:
                if grammar is not None:
                    llama_cpp.llama_sampler_free(grammar)
            self._probes.clear()
            for s in samples.values():
                llama_cpp.llama_sampler_free(s.chain)
                if s.grammar:
                    llama_cpp.llama_sampler_free(s.grammar)
            llama_cpp.llama_memory_clear(self._mem, True)
        for (ri, si), s in samples.items():
            stats.n_generated_tokens += len(s.tokens)
            text, digit_probs, ten_probs = _decode_pieces(s.pieces, s.digits, s.tens)
            results[ri][si] = Completion(text=text, n_tokens=len(s.tokens), finish_reason=s.finish, seed=s.seed,
                                         digit_probs=digit_probs, ten_probs=ten_probs)

    def _prefix_state(self, request: Request, states: dict, stats: GenerationStats) -> None:
        """Have the saved state of the request's prefix in `states`: from the cache, else evaluated
        alone from an empty memory (then offered to the cache)."""
        p = request.prefix_len
        prefix = request.tokens[:p]
        if not p or prefix in states:
            return
        cache = self.prefix_cache
        key = (cache_key(*self.cache_scope(hash_file=cache.directory is not None), prefix)
               if cache is not None and cache.enabled else None)
        data = cache.get(key, request.owner) if key is not None else None
        if data is not None:
            stats.cache_hits += 1
            stats.n_cached_tokens += p
        else:
            llama_cpp.llama_memory_clear(self._mem, True)
            stats.n_prompt_tokens += self._eval_span(0, prefix, 0, logits_last=False)
            data = self._save(0)
            stats.cache_misses += 1
            if key is not None:
                cache.put(key, data, request.owner)
        states[prefix] = data

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
                st = os.stat(self.model_path)
                model_id = f"{os.path.abspath(self.model_path)}:{st.st_size}:{st.st_mtime_ns}"
            self._cache_scope_hashed = hash_file or self._model_id is not None
            build = f"{llama_cpp.__version__} {llama_cpp.llama_print_system_info().decode('utf-8', 'replace')}"
            self._cache_scope = (model_id, build, self.device, self.n_ctx, self.n_batch, self.n_seq_max,
                                 self.kv_unified, self._flash_attn, self.n_threads, self.chat_template or "")
        return self._cache_scope

    def _eval_span(self, seq: int, tokens: Sequence[int], start: int, *, logits_last: bool) -> int:
        """Evaluate tokens[start:] into `seq` at their positions, n_batch at a time. Returns the count."""
        end = len(tokens)
        pos = start
        while pos < end:
            chunk = tokens[pos:pos + self.n_batch]
            self._fill_batch([(tok, pos + i, seq, logits_last and pos + i == end - 1)
                              for i, tok in enumerate(chunk)])
            self._decode()
            pos += len(chunk)
        return end - start

    def _save(self, seq: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq)
        if n != size:
            raise EngineError(f"llama.cpp saved {n} of {size} bytes of a sequence state")
        return bytes(buf)

    def _restore(self, data: bytes, seq: int) -> None:
        buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))  # no copy; llama.cpp only reads
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), seq) != len(data):
            raise EngineError("llama.cpp could not restore a saved prompt prefix (no free KV slot, or "
                              "a state from another model or context); load with a larger n_ctx")

    def _prefill(self, seq: int, tokens: tuple[int, ...], evaluated) -> int:
        """Put `tokens` into sequence `seq`, copying the longest prefix already cached. Returns tokens evaluated."""
        best_len, best_seq = 0, -1
        for other_seq, other in evaluated:
            n = common_prefix(tokens, other)
            if n > best_len:
                best_len, best_seq = n, other_seq
        # Keep at least the last token to evaluate, so its logits exist.
        best_len = min(best_len, len(tokens) - 1)
        if best_len > 0:
            self._copy_prefix(best_seq, seq, best_len)
        start = best_len
        while start < len(tokens):
            chunk = tokens[start:start + self.n_batch]
            self._fill_batch([(tok, start + i, seq, start + i == len(tokens) - 1) for i, tok in enumerate(chunk)])
            self._decode()
            start += len(chunk)
        return len(tokens) - best_len

    def _copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Give `dst` the cells of `src` at positions [0, n).

        Across split streams llama.cpp copies whole streams only, so copy all, then drop the tail.
        """
        if self.kv_unified:
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        else:
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, dst, n, -1)

    def _decode_loop(self, samples: list[_Sample], params: SamplingParams) -> None:
        active = [s for s in samples if not s.done]
        while active:
            self._fill_batch([(s.next_token, s.pos, s.seq, True) for s in active])
            self._decode()
            for row, s in enumerate(active):
                s.pos += 1
                self._accept(s, self._sample(s, row), params)
            self._run_probes()
            active = [s for s in active if not s.done]

    def _accept(self, s: _Sample, token: int, params: SamplingParams) -> None:
        if self.is_eog(token):
            s.done, s.finish = True, "stop"
            return
        s.tokens.append(token)
        s.pieces.append(self.token_bytes(token))
        s.next_token = token
        if len(s.tokens) >= params.max_tokens:
            s.done, s.finish = True, "length"

    def _fill_batch(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self._batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)

    def _decode(self) -> None:
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc == 1:
            raise EngineError("llama.cpp found no free KV slot; the context is too small for this "
                              "batch (load with a larger n_ctx or lower the sample count)")
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")

    def _sample(self, s: _Sample, row: int) -> int:
        """Draw one token for `s` from batch row `row` and advance its grammar."""
        token = self._draw(s, row)
        if self._want_digits and token in self._digit_of:
            probs = self._digit_distribution(s, row)
            s.digits[len(s.tokens)] = probs
            if probs[1] > 0 and not (s.pieces and s.pieces[-1][-1:].isdigit()):
                self._queue_ten_probe(s)
        if s.grammar is not None:
            llama_cpp.llama_sampler_accept(s.grammar, token)
        return token

    def _queue_ten_probe(self, s: _Sample) -> None:
        """At a number's first digit: if "1" may be followed by "0" here, ask P("0" | "1") after this step."""
        grammar = llama_cpp.llama_sampler_clone(s.grammar) if s.grammar is not None else None
        if grammar is not None:
            llama_cpp.llama_sampler_accept(grammar, self._digit_token[1])
            if not self._allows(grammar, self._digit_token[0]):
                llama_cpp.llama_sampler_free(grammar)
                return
        self._probes.append((s, len(s.tokens), grammar))

    def _allows(self, grammar, token: int) -> bool:
        one = self._one
        one.load(token)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(one.arr))
        return bool(np.isfinite(one.view["logit"][0]))

    def _probs(self, row: int, grammar, arr: "_TokenArray", ids: np.ndarray) -> np.ndarray:
        """P(token) over `ids` at batch row `row`: temperature applied, grammar-masked, normalised."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        z = logits[ids].astype(np.float64) / self._digit_temperature
        if grammar is not None:
            arr.load(ids)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr.arr))
            z = np.where(np.isfinite(arr.view["logit"]), z, -np.inf)
        p = np.exp(z - z.max())
        return p / p.sum()

    def _run_probes(self) -> None:
        """Evaluate "1" in a scratch copy of each queued sequence; record P("0") next (grammar applied).

        One token per probe, in the sequence reserved for probes (the last id), after the
        step's sampling so the batch's logits are no longer needed.
        """
        probe_seq = self.n_seq_max - 1
        while self._probes:
            s, index, grammar = self._probes.pop()
            try:
                llama_cpp.llama_memory_seq_rm(self._mem, probe_seq, -1, -1)
                self._copy_prefix(s.seq, probe_seq, s.pos)
                self._fill_batch([(self._digit_token[1], s.pos, probe_seq, True)])
                self._decode()
                p = self._probs(0, grammar, self._full, self._all_ids)
                s.tens[index] = float(p[self._digit_ids[self._digit_values == 0]].sum())
            finally:
                if grammar is not None:
                    llama_cpp.llama_sampler_free(grammar)
                llama_cpp.llama_memory_seq_rm(self._mem, probe_seq, -1, -1)

    def _draw(self, s: _Sample, row: int) -> int:
        """A token from the grammar-masked distribution, without advancing the grammar.

        The token is first drawn without the grammar and kept if the grammar accepts it;
        only when it does not is the grammar applied to the whole vocabulary and the draw
        repeated. Both paths together draw exactly from the grammar-masked distribution
        (p(x) + (1 - Z) p(x) / Z = p(x) / Z), at a fraction of the cost of masking every step.
        """
        token = llama_cpp.llama_sampler_sample(s.chain, self._ctx, row)
        if s.grammar is None or self._allows(s.grammar, token):
            return token
        full = self._full
        full.load(self._all_ids, np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row),
                                                       shape=(self.n_vocab,)))
        llama_cpp.llama_sampler_apply(s.grammar, ctypes.byref(full.arr))
        llama_cpp.llama_sampler_apply(s.chain, ctypes.byref(full.arr))
        if full.arr.selected < 0:
            raise EngineError("the sampler selected no token (the grammar allows nothing here)")
        return full.arr.data[full.arr.selected].id

    def _digit_distribution(self, s: _Sample, row: int) -> tuple[float, ...]:
        """P(digit) over "0".."9" at this step: temperature applied, grammar-masked, summed per digit."""
        p = self._probs(row, s.grammar, self._digits_arr, self._digit_ids)
        return tuple(float(x) for x in np.bincount(self._digit_values, weights=p, minlength=10))

    def _prepare_digits(self, params: SamplingParams) -> None:
        """Find the vocabulary's digit tokens (once) when a call asks for digit distributions."""
        self._want_digits = params.digit_probs
        self._digit_temperature = params.temperature if params.temperature > 0 else 1.0
        if not params.digit_probs or self._digit_ids is not None:
            return
        found = [(t, int(piece)) for t in range(self.n_vocab)
                 if len(piece := self.token_bytes(t)) == 1 and piece.isdigit()]
        if {d for _, d in found} != set(range(10)):
            raise ConfigError("digit read-outs need a vocabulary with a token for each digit 0-9; this "
                              "model's has none for some, so turn the expected-score read-out off")
        self._digit_ids = np.array([t for t, _ in found], dtype=np.int32)
        self._digit_values = np.array([d for _, d in found], dtype=np.int64)
        self._digit_of = {t: d for t, d in found}
        # The token written for a digit: the first found (byte-level vocabularies have one).
        self._digit_token = {d: next(t for t, v in found if v == d) for d in range(10)}
        self._digits_arr = _TokenArray(len(found))
        if self.n_seq_max < 2:
            raise ConfigError("digit read-outs need n_seq_max >= 2 (one sequence is kept for probes)")

    def _make_grammar(self, params: SamplingParams):
        if not params.grammar:
            return None
        g = llama_cpp.llama_sampler_init_grammar(self._vocab, params.grammar.encode(), b"root")
        if not g:
            raise ConfigError("llama.cpp rejected the grammar (GBNF syntax error)")
        return g

    def grammar_accepts(self, grammar: str, text: str) -> bool:
        """Whether `grammar` lets this model write `text` (as this vocabulary tokenizes it) and then stop."""
        self._require_open()
        g = self._make_grammar(SamplingParams(grammar=grammar))
        try:
            for token in self.tokenize(text) + [llama_cpp.llama_vocab_eos(self._vocab)]:
                if not self._allows(g, token):
                    return False
                llama_cpp.llama_sampler_accept(g, token)
            return True
        finally:
            llama_cpp.llama_sampler_free(g)

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
        llama_cpp.llama_memory_clear(self._mem, True)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            self._fill_batch([(t, start + i, 0, True) for i, t in enumerate(chunk)])
            self._decode()
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(len(chunk), self.n_vocab))
            rows = rows.astype(np.float32) - rows.max(axis=1, keepdims=True)
            yield rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        llama_cpp.llama_memory_clear(self._mem, True)

    def _make_chain(self, seed: int, params: SamplingParams):
        sparams = llama_cpp.llama_sampler_chain_default_params()
        sparams.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(sparams)
        if params.temperature == 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain


class _TokenArray:
    """A reusable llama_token_data_array with a numpy view on its storage."""

    def __init__(self, n: int):
        self.data = (llama_cpp.llama_token_data * n)()
        self.arr = llama_cpp.llama_token_data_array(data=self.data, size=n, selected=-1, sorted=False)
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self.view = np.frombuffer(self.data, dtype=dtype)

    def load(self, ids: np.ndarray | int, logits: np.ndarray | float = 0.0) -> None:
        """Hold these candidates (one per slot) and logits, unsorted and unselected, for a sampler."""
        self.view["id"] = ids
        self.view["logit"] = logits
        self.view["p"] = 0.0
        self.arr.data = self.data  # a sampler may have pointed it elsewhere
        self.arr.size, self.arr.selected, self.arr.sorted = len(self.view), -1, False


def _decode_pieces(pieces: list[bytes], digits: dict[int, tuple[float, ...]],
                   tens: dict[int, float]) -> tuple[str, dict, dict]:
    """The text of the pieces, with the digit records keyed by character offset in it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    n_chars = 0
    digit_at: dict[int, tuple[float, ...]] = {}
    ten_at: dict[int, float] = {}
    for i, piece in enumerate(pieces):
        part = decoder.decode(piece)
        if i in digits:  # a digit piece is one ASCII byte: the last character decoded
            digit_at[n_chars + len(part) - 1] = digits[i]
            if i in tens:
                ten_at[n_chars + len(part) - 1] = tens[i]
        parts.append(part)
        n_chars += len(part)
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts), digit_at, ten_at


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prompt_cells(requests: Sequence[Request]) -> int:
    """Cells the prompts occupy: a cacheable prefix (and a call-shared span) is shared only with
    requests of the same one; a prompt without one reuses its longest prefix with an earlier prompt."""
    seen: list[tuple[int, ...]] = []
    prefixes: set[tuple[int, ...]] = set()
    spans: set[tuple[int, ...]] = set()
    total = 0
    for r in requests:
        if r.prefix_len:
            prefix, span = r.tokens[:r.prefix_len], r.tokens[:r.shared_len]
            reused = r.shared_len if r.shared_len and span in spans else r.prefix_len if prefix in prefixes else 0
            total += len(r.tokens) - reused
            prefixes.add(prefix)
            if r.shared_len:
                spans.add(span)
        else:
            shared = max((common_prefix(r.tokens, s) for s in seen), default=0)
            total += len(r.tokens) - min(shared, len(r.tokens) - 1)
        seen.append(r.tokens)
    return total
