"""Per-sequence sampling on llama.cpp: a seeded sampler chain and an optional grammar.

Each `Grammar` and `SequenceSampler` owns its native sampler pointers and frees them in `close`.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ._llama import llama_cpp
from .errors import ConfigError, EngineError
from .llama_context import LlamaContext


class TokenArray:
    """A reusable llama_token_data_array with a numpy view on its storage."""

    def __init__(self, n: int):
        self.data = (llama_cpp.llama_token_data * n)()
        self.arr = llama_cpp.llama_token_data_array(data=self.data, size=n, selected=-1, sorted=False)
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self.view = np.frombuffer(self.data, dtype=dtype)  # type: ignore[call-overload]

    def load(self, ids: np.ndarray | int, logits: np.ndarray | float = 0.0) -> None:
        """Hold these candidates (one per slot) and logits, unsorted and unselected, for a sampler."""
        self.view["id"] = ids
        self.view["logit"] = logits
        self.view["p"] = 0.0
        self.arr.data = self.data  # a sampler may have pointed it elsewhere
        self.arr.size, self.arr.selected, self.arr.sorted = len(self.view), -1, False


class VocabArray(TokenArray):
    """A TokenArray over the whole vocabulary, with its ids at hand."""

    def __init__(self, n_vocab: int):
        super().__init__(n_vocab)
        self.ids = np.arange(n_vocab, dtype=np.int32)


class Grammar:
    """A GBNF grammar's state as a llama.cpp sampler: which tokens it allows next."""

    def __init__(self, ptr):
        self.ptr = ptr
        self._one = TokenArray(1)

    @classmethod
    def compile(cls, vocab, text: str) -> "Grammar":
        ptr = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not ptr:
            raise ConfigError("llama.cpp rejected the grammar (GBNF syntax error)")
        return cls(ptr)

    def clone(self) -> "Grammar":
        """An independent copy of the current state (accepting into it leaves this one as is)."""
        return Grammar(llama_cpp.llama_sampler_clone(self.ptr))

    def allows(self, token: int) -> bool:
        one = self._one
        one.load(token)
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(one.arr))
        return bool(np.isfinite(one.view["logit"][0]))

    def mask(self, candidates: TokenArray) -> None:
        """Set the logit of every candidate the grammar forbids here to -inf."""
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(candidates.arr))

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.ptr, token)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


def _chain(seed: int, temperature: float, top_p: float, min_p: float):
    sparams = llama_cpp.llama_sampler_chain_default_params()
    sparams.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(sparams)
    if temperature == 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
    if min_p > 0.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(min_p, 1))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class SequenceSampler:
    """One sequence's sampler: a seeded chain (top-p, min-p, temperature, draw) and its grammar.

    `vocab_scratch` (the whole vocabulary's candidates) is shared by the samplers of a call:
    it only holds candidates during one `sample`.
    """

    def __init__(self, seed: int, *, temperature: float, top_p: float, min_p: float,
                 grammar: Grammar | None, vocab_scratch: VocabArray):
        self.seed = seed
        self.grammar = grammar
        self.chain = _chain(seed, temperature, top_p, min_p)
        self._full = vocab_scratch

    def sample(self, context: LlamaContext, row: int) -> int:
        """A token from the grammar-masked distribution at batch row `row`, without advancing the grammar.

        The token is first drawn without the grammar and kept if the grammar accepts it;
        only when it does not is the grammar applied to the whole vocabulary and the draw
        repeated. Both paths together draw exactly from the grammar-masked distribution
        (p(x) + (1 - Z) p(x) / Z = p(x) / Z), at a fraction of the cost of masking every step
        (llama.cpp's common_sampler_sample does the same unless asked for grammar first).
        """
        token = llama_cpp.llama_sampler_sample(self.chain, context.ptr, row)
        if self.grammar is None or self.grammar.allows(token):
            return token
        full = self._full
        full.load(full.ids, context.logits(row))
        self.grammar.mask(full)
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(full.arr))
        if full.arr.selected < 0:
            raise EngineError("the sampler selected no token (the grammar allows nothing here)")
        return int(full.arr.data[full.arr.selected].id)

    def accept(self, token: int) -> None:
        """Advance the grammar past `token` (the chain's draw already advanced the chain)."""
        if self.grammar is not None:
            self.grammar.accept(token)

    def close(self) -> None:
        if getattr(self, "chain", None):
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            self.grammar.close()
