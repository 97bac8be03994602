"""The digit read-out: the sampling distribution over "0".."9" wherever a sample draws a digit.

A generate call that asks for it (`SamplingParams.digit_probs`) gets one `DigitReadout`; it
records, for each drawn digit, the distribution at that step (temperature applied, grammar
applied), and at a number's first digit, where "1" could open "10", P(the next token is "0" |
"1") from a one-token probe. Probes run in the sequence reserved for them (the last id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .llama_context import LlamaContext
from .llama_model import LlamaModel
from .llama_sampler import Grammar, TokenArray, VocabArray

if TYPE_CHECKING:
    from .batched import Sample


@dataclass(frozen=True)
class DigitTokens:
    """The vocabulary's single-digit tokens."""

    ids: np.ndarray  # token ids of every one-byte digit piece
    values: np.ndarray  # the digit each of `ids` writes
    digit_of: dict[int, int]  # token id -> digit
    token: dict[int, int]  # digit -> the token written for it (the first found)

    @classmethod
    def of_model(cls, model: LlamaModel) -> "DigitTokens":
        """Found once per model (a pass over the vocabulary), then kept on it."""
        if model.digit_tokens is None:
            found = [(t, int(piece)) for t in range(model.n_vocab)
                     if len(piece := model.token_bytes(t)) == 1 and piece.isdigit()]
            if {d for _, d in found} != set(range(10)):
                raise ConfigError("digit read-outs need a vocabulary with a token for each digit 0-9; this "
                                  "model's has none for some, so turn the expected-score read-out off")
            # Byte-level vocabularies have one token per digit; otherwise the first found is written.
            model.digit_tokens = cls(ids=np.array([t for t, _ in found], dtype=np.int32),
                                     values=np.array([d for _, d in found], dtype=np.int64),
                                     digit_of={t: d for t, d in found},
                                     token={d: next(t for t, v in found if v == d) for d in range(10)})
        return model.digit_tokens


class DigitReadout:
    """One generate call's digit records; `observe` each draw, `run_probes` after each step's draws."""

    def __init__(self, model: LlamaModel, context: LlamaContext, temperature: float, vocab_scratch: VocabArray):
        self.digits = DigitTokens.of_model(model)
        if context.n_seq_max < 2:
            raise ConfigError("digit read-outs need n_seq_max >= 2 (one sequence is kept for probes)")
        self._context = context
        self._temperature = temperature if temperature > 0 else 1.0
        self._digits_arr = TokenArray(len(self.digits.ids))
        self._full = vocab_scratch
        self._probe_seq = context.n_seq_max - 1
        self._probes: list[tuple["Sample", int, Grammar | None]] = []

    def observe(self, s: "Sample", row: int, token: int) -> None:
        """Record the digit distribution at this draw if `token` is a digit (before the grammar accepts it)."""
        if token not in self.digits.digit_of:
            return
        grammar = s.sampler.grammar
        p = self._probs(row, grammar, self._digits_arr, self.digits.ids)
        probs = tuple(float(x) for x in np.bincount(self.digits.values, weights=p, minlength=10))
        s.digits[len(s.tokens)] = probs
        if probs[1] > 0 and not (s.pieces and s.pieces[-1][-1:].isdigit()):
            self._queue_ten_probe(s, grammar)

    def _queue_ten_probe(self, s: "Sample", grammar: Grammar | None) -> None:
        """At a number's first digit: if "1" may be followed by "0" here, ask P("0" | "1") after this step."""
        probe = grammar.clone() if grammar is not None else None
        if probe is not None:
            probe.accept(self.digits.token[1])
            if not probe.allows(self.digits.token[0]):
                probe.close()
                return
        self._probes.append((s, len(s.tokens), probe))

    def _probs(self, row: int, grammar: Grammar | None, arr: TokenArray, ids: np.ndarray) -> np.ndarray:
        """P(token) over `ids` at batch row `row`: temperature applied, grammar-masked, normalised."""
        z = self._context.logits(row)[ids].astype(np.float64) / self._temperature
        if grammar is not None:
            arr.load(ids)
            grammar.mask(arr)
            z = np.where(np.isfinite(arr.view["logit"]), z, -np.inf)
        p = np.exp(z - z.max())
        return p / p.sum()

    def run_probes(self) -> None:
        """Evaluate "1" in a scratch copy of each queued sequence; record P("0") next (grammar applied).

        One token per probe, in the probe sequence, after the step's sampling so the batch's
        logits are no longer needed.
        """
        ctx, seq, one = self._context, self._probe_seq, self.digits.token[1]
        zeros = self.digits.ids[self.digits.values == 0]
        while self._probes:
            s, index, grammar = self._probes.pop()
            try:
                ctx.seq_remove(seq)
                ctx.seq_copy(s.seq, seq, s.pos)
                ctx.decode([(one, s.pos, seq, True)])
                p = self._probs(0, grammar, self._full, self._full.ids)
                s.tens[index] = float(p[zeros].sum())
            finally:
                if grammar is not None:
                    grammar.close()
                ctx.seq_remove(seq)

    def drop_pending(self) -> None:
        """Free the grammars of probes that never ran (a group that failed mid-step)."""
        while self._probes:
            _, _, grammar = self._probes.pop()
            if grammar is not None:
                grammar.close()
