"""Batched sampling on one context: several prompts, each with several seeded samples, decoded together.

The prompt layout is fixed by the call's requests alone, never by a cache, so the same seed
gives bitwise the same samples:
- a cacheable prefix (`Request.prefix_len`) is evaluated alone, from an empty memory, into
  sequence 0 at positions 0..P-1 in n_batch spans, and its sequence state saved (`PrefixStates`);
  the first request of a group with that prefix restores it, later ones copy its cells;
- a call-shared span (`Request.shared_len`) is evaluated once per group after the prefix, as its
  own span; later requests holding it copy its cells and evaluate only their rest;
- a prompt without a cacheable prefix copies its longest prefix with an earlier prompt of the group;
- every sample of a request copies the request's first sequence; sequence ids are handed out
  in request order, and the last id is kept for the digit read-out's probes.
"""

from __future__ import annotations

import codecs
import time
from typing import Callable, Sequence

from .digit_readout import DigitReadout
from .generation import Completion, GenerationStats, Request, SamplingParams, common_prefix, prompt_cells
from .llama_context import LlamaContext
from .llama_model import LlamaModel
from .llama_sampler import Grammar, SequenceSampler, VocabArray
from .prefix_cache import PrefixCache, cache_key


class Sample:
    """Decoding state of one sequence."""

    __slots__ = ("seq", "seed", "sampler", "pos", "tokens", "pieces", "done", "finish", "next_token",
                 "digits", "tens")

    def __init__(self, seq: int, seed: int, sampler: SequenceSampler, pos: int):
        self.seq = seq
        self.seed = seed
        self.sampler = sampler
        self.pos = pos
        self.tokens: list[int] = []
        self.pieces: list[bytes] = []
        self.done = False
        self.finish = "length"
        self.next_token = -1
        self.digits: dict[int, tuple[float, ...]] = {}  # token index -> digit distribution
        self.tens: dict[int, float] = {}  # token index -> P("0" after a "1" here)


def plan_groups(requests: Sequence[Request], max_tokens: int, *, n_ctx: int, n_seq_max: int,
                kv_unified: bool, reserve: int = 0) -> list[list[tuple[int, int]]]:
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
            cells = (prompt_cells(list(trial.values())) + (len(current) + 1) * max_tokens + reserve
                     if kv_unified else 0)
            if current and (cells > n_ctx or len(current) + 1 > n_seq_max - reserve):
                groups.append(current)
                current, current_reqs = [], {}
            current.append((ri, si))
            current_reqs[ri] = req
    if current:
        groups.append(current)
    return groups


class PrefixStates:
    """One call's saved states of cacheable prefixes, by prefix tokens; from the cache or evaluated."""

    def __init__(self, context: LlamaContext, cache: PrefixCache | None, scope: Callable[..., tuple]):
        self._context = context
        self._cache = cache
        self._scope = scope  # Engine.cache_scope
        self._states: dict[tuple[int, ...], bytes] = {}

    def __getitem__(self, prefix: tuple[int, ...]) -> bytes:
        return self._states[prefix]

    def ensure(self, request: Request, stats: GenerationStats) -> None:
        """Have the saved state of the request's prefix: from the cache, else evaluated alone from
        an empty memory into sequence 0 (then offered to the cache)."""
        p = request.prefix_len
        prefix = request.tokens[:p]
        if not p or prefix in self._states:
            return
        cache = self._cache
        key = (cache_key(*self._scope(hash_file=cache.directory is not None), prefix)
               if cache is not None and cache.enabled else None)
        data = cache.get(key, request.owner) if key is not None else None  # type: ignore[union-attr]
        if data is not None:
            stats.cache_hits += 1
            stats.n_cached_tokens += p
        else:
            self._context.clear()
            stats.n_prompt_tokens += self._context.eval_span(0, prefix, 0, logits_last=False)
            data = self._context.save(0)
            stats.cache_misses += 1
            if key is not None:
                cache.put(key, data, request.owner)  # type: ignore[union-attr]
        self._states[prefix] = data


class GroupRun:
    """One group of samples: lay out the prompts, draw every first token, then step until all are done."""

    def __init__(self, model: LlamaModel, context: LlamaContext, params: SamplingParams,
                 vocab_scratch: VocabArray, readout: DigitReadout | None, prefixes: PrefixStates):
        self.model, self.context, self.params = model, context, params
        self._scratch = vocab_scratch
        self.readout = readout
        self.prefixes = prefixes
        self.samples: dict[tuple[int, int], Sample] = {}
        self._evaluated: list[tuple[int, tuple[int, ...]]] = []  # (seq, tokens) of prompts in memory
        self._placed: dict[tuple[int, ...], int] = {}  # cacheable prefix -> the sequence holding it
        self._shared: dict[tuple[int, ...], int] = {}  # a call-shared span's tokens -> the sequence holding it

    def run(self, requests: Sequence[Request], group: list[tuple[int, int]],
            results: list[list[Completion | None]], stats: GenerationStats) -> None:
        # Which samples each request owns in this group; the first one's sequence holds the prompt.
        by_req: dict[int, list[int]] = {}
        for ri, si in group:
            by_req.setdefault(ri, []).append(si)
        seq_ids = iter(range(self.context.n_seq_max))
        try:
            t0 = time.perf_counter()
            for ri in by_req:
                self.prefixes.ensure(requests[ri], stats)
            self.context.clear()
            for ri, sis in by_req.items():
                seqs = [next(seq_ids) for _ in sis]
                stats.n_prompt_tokens += self._place_prompt(requests[ri], seqs[0])
                for seq in seqs[1:]:
                    self.context.seq_copy(seqs[0], seq)
                self._start(requests[ri], ri, sis, seqs)
            t1 = time.perf_counter()
            stats.prompt_s += t1 - t0
            self._decode_loop()
            stats.decode_s += time.perf_counter() - t1
        finally:
            if self.readout is not None:
                self.readout.drop_pending()
            for s in self.samples.values():
                s.sampler.close()
            self.context.clear()
        for (ri, si), s in self.samples.items():
            stats.n_generated_tokens += len(s.tokens)
            text, digit_probs, ten_probs = decode_pieces(s.pieces, s.digits, s.tens)
            results[ri][si] = Completion(text=text, n_tokens=len(s.tokens), finish_reason=s.finish, seed=s.seed,
                                         digit_probs=digit_probs, ten_probs=ten_probs)

    def _place_prompt(self, request: Request, owner: int) -> int:
        """Put the request's prompt into sequence `owner` (see the module's layout). Returns tokens evaluated."""
        ctx, tokens = self.context, request.tokens
        p, q = request.prefix_len, request.shared_len
        n = 0
        if q and tokens[:q] in self._shared:
            ctx.seq_copy(self._shared[tokens[:q]], owner, q)
            n += ctx.eval_span(owner, tokens, q, logits_last=True)
        elif p:
            prefix = tokens[:p]
            if prefix in self._placed:
                ctx.seq_copy(self._placed[prefix], owner, p)
            else:
                ctx.restore(self.prefixes[prefix], owner)
                self._placed[prefix] = owner
            if q:
                n += ctx.eval_span(owner, tokens[:q], p, logits_last=False)
                self._shared[tokens[:q]] = owner
            n += ctx.eval_span(owner, tokens, max(p, q), logits_last=True)
        else:
            n += self._prefill(owner, tokens)
        self._evaluated.append((owner, tokens))
        return n

    def _prefill(self, seq: int, tokens: tuple[int, ...]) -> int:
        """Put `tokens` into `seq`, copying the longest prefix already in memory. Returns tokens evaluated."""
        best_len, best_seq = 0, -1
        for other_seq, other in self._evaluated:
            n = common_prefix(tokens, other)
            if n > best_len:
                best_len, best_seq = n, other_seq
        # Keep at least the last token to evaluate, so its logits exist.
        best_len = min(best_len, len(tokens) - 1)
        if best_len > 0:
            self.context.seq_copy(best_seq, seq, best_len)
        return self.context.eval_span(seq, tokens, best_len, logits_last=True)

    def _start(self, request: Request, ri: int, sis: list[int], seqs: list[int]) -> None:
        """Each sample's first token, from the prompt's last logits (the batch's last row)."""
        params = self.params
        last_row = self.context.batch.n_tokens - 1
        for si, seq in zip(sis, seqs):
            seed = request.seeds[si]
            grammar = Grammar.compile(self.model.vocab, params.grammar) if params.grammar else None
            sampler = SequenceSampler(seed, temperature=params.temperature, top_p=params.top_p,
                                      min_p=params.min_p, grammar=grammar, vocab_scratch=self._scratch)
            s = self.samples[(ri, si)] = Sample(seq, seed, sampler, len(request.tokens))
            self._accept(s, self._draw(s, last_row))
        if self.readout is not None:
            self.readout.run_probes()  # before the next prompt's batch overwrites these logits

    def _decode_loop(self) -> None:
        active = [s for s in self.samples.values() if not s.done]
        while active:
            self.context.decode([(s.next_token, s.pos, s.seq, True) for s in active])
            for row, s in enumerate(active):
                s.pos += 1
                self._accept(s, self._draw(s, row))
            if self.readout is not None:
                self.readout.run_probes()
            active = [s for s in active if not s.done]

    def _draw(self, s: Sample, row: int) -> int:
        """Draw one token for `s` from batch row `row`, record its digits if asked, advance its grammar."""
        token = s.sampler.sample(self.context, row)
        if self.readout is not None:
            self.readout.observe(s, row, token)
        s.sampler.accept(token)
        return token

    def _accept(self, s: Sample, token: int) -> None:
        if self.model.is_eog(token):
            s.done, s.finish = True, "stop"
            return
        s.tokens.append(token)
        s.pieces.append(self.model.token_bytes(token))
        s.next_token = token
        if len(s.tokens) >= self.params.max_tokens:
            s.done, s.finish = True, "length"


def decode_pieces(pieces: list[bytes], digits: dict[int, tuple[float, ...]],
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
