"""The `Scorer` facade: personalised rewards for one user, with test-time user-based scaling.

It composes the pieces: the protocol renders prompts and parses chains, the engine draws
all samples of a call in one batch, the prototype index supplies similar users, and the
scaling module averages. One Scorer may be shared by threads; calls are serialised.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import contracts, group_rewards, protocol, scaling
from .bundle import Bundle, is_bundle_dir, model_file_ok
from .engine import Engine, Request, SamplingParams, common_prefix
from .errors import ChainParseError, ClosedError, ConfigError, ContextOverflowError
from .group_rewards import GroupMethod
from .prefix_cache import DEFAULT_DISK_MB, DEFAULT_MEMORY_MB, PrefixCache
from .records import (MAX_SEED, CompareResult, Confidence, EvaluationChain, GroupScores, LevelConfidence,
                      NeighborScore, Sample, Timing, UserProfile)

# Fitting policy, in order: drop shown history pairs down to one, then shorten every
# untrusted text (history, query, candidates) to these lengths, keeping head and tail.
SHORTEN_STEPS = (4000, 2000, 1000, 500, 250)
MAX_RESPONSES = 16  # score() compares all pairs: k(k-1)/2 pairs
PERSONA_MODES = ("cached", "query")


@dataclass(frozen=True)
class _Prepared:
    """The prompts for one (history owner, candidate pair): both candidate orders."""

    tokens: dict[bool, tuple[int, ...]]  # swapped -> prompt tokens
    messages: dict[bool, list[dict]]  # swapped -> the chat messages those tokens render
    history_shown: int
    policy: tuple[str, ...]
    prefix_len: int = 0  # tokens both orders share up to a control token (the system message): cacheable
    shared_len: int = 0  # tokens both orders share (the prefix, then the user's query): evaluated once per call


@dataclass
class _Job:
    kind: str  # "self" | "neighbor"
    owner: UserProfile
    pair: tuple[int, int]
    seed: int
    swapped: bool
    similarity: float = 1.0


class Scorer:
    """Scores candidate responses for one user with a P-GenRM model.

    Build it with `Scorer.from_bundle(path, ...)` or `Scorer.from_gguf(path, ...)`.
    `n_samples` (m) chains are drawn with the user's own history and `n_neighbors` (n)
    with the histories of the most similar prototype members; see `scaling`.
    """

    def __init__(self, engine: Engine, *, n_samples: int = 1, n_neighbors: int = 0, seed: int = 0,
                 max_tokens: Optional[int] = None, temperature: float = 1.0, top_p: float = 1.0,
                 min_p: float = 0.0, constrained: Optional[bool] = None,
                 history_pairs: int = protocol.DEFAULT_HISTORY_PAIRS, c_self: float = 0.5, c_nb: float = 0.5,
                 analysis_chars: Optional[tuple[int, int]] = None, rationale_chars: Optional[int] = None,
                 max_criteria: int = protocol.DEFAULT_MAX_CRITERIA, expected_scores: bool = False,
                 history_order: Optional[str] = None, candidate_order: Optional[str] = None,
                 min_confidence: Optional[float] = None, persona_mode: str = "cached",
                 prefix_cache_mb: float = DEFAULT_MEMORY_MB, prefix_cache_dir: str | os.PathLike | None = None,
                 prefix_cache_disk_mb: float = DEFAULT_DISK_MB,
                 template=None, prototypes=None, bundle: Bundle | None = None):
        """Options left as None take the output contract's defaults (see `contracts.CONTRACTS`):
        the template names its contract, structured (the default) or official.

        The prompt-prefix cache keeps the evaluated system messages (template + shown history)
        of recent users, up to `prefix_cache_mb` in memory (0: none) and, with
        `prefix_cache_dir`, on disk up to `prefix_cache_disk_mb`; results do not depend on it."""
        _check_counts(n_samples, n_neighbors)
        seed = check_seed(seed)
        if n_neighbors > 0 and prototypes is None:
            raise ConfigError("n_neighbors > 0 needs a prototype index, and this bundle has none; build "
                              "one with `python -m export prototypes --bundle DIR ...` or set n_neighbors=0")
        if history_pairs < 0:
            raise ConfigError("history_pairs must be >= 0")
        scaling.combine([], [], c_self=c_self, c_nb=c_nb)  # validates the weights
        self.engine = engine
        self.bundle = bundle
        self.prototypes = prototypes
        self.template = protocol.resolve_template(template)
        self.contract = contract = self.template.output_contract
        self.n_samples, self.n_neighbors, self.seed = n_samples, n_neighbors, seed
        self.history_pairs = history_pairs
        self.c_self, self.c_nb = c_self, c_nb
        self.history_order = history_order or contract.history_order
        self.candidate_order = candidate_order or contract.candidate_order
        if self.history_order not in ("original", "sampled"):
            raise ConfigError(f"history_order must be 'original' or 'sampled', got {self.history_order!r}")
        if self.candidate_order not in ("sample", "item"):
            raise ConfigError(f"candidate_order must be 'sample' (drawn per sample) or 'item' (once per pair, "
                              f"as the official pipeline), got {self.candidate_order!r}")
        is_share = (not isinstance(min_confidence, bool) and isinstance(min_confidence, (int, float))
                    and 0 < min_confidence <= 1)
        if min_confidence is not None and not is_share:
            raise ConfigError(f"min_confidence must be a share in (0, 1] of the parsed chains, got {min_confidence!r}")
        # A verdict preferred by fewer than this share of the parsed chains becomes no decision.
        self.min_confidence = min_confidence
        if persona_mode not in PERSONA_MODES:
            raise ConfigError(f"persona_mode must be 'cached' (the first persona parsed for a user, reused) or "
                              f"'query' (this call's first parsed chain, as the official pipeline), "
                              f"got {persona_mode!r}")
        # Which persona finds the neighbours of an LLM-persona index (see _persona_text).
        self.persona_mode = persona_mode
        self.constrained = contract.constrained if constrained is None else bool(constrained)
        max_tokens = contract.max_tokens if max_tokens is None else max_tokens
        analysis_chars = contract.analysis_chars if analysis_chars is None else tuple(analysis_chars)
        # Read each chain's final scores as expected values over the digits (see
        # protocol.expected_final_scores) instead of the sampled numbers.
        self.expected_scores = bool(expected_scores)
        grammar = None
        if self.constrained:
            grammar = contracts.grammar_for(contract, analysis_chars=analysis_chars, max_criteria=max_criteria,
                                            rationale_chars=rationale_chars)
            need = contracts.token_need(contract, analysis_chars=analysis_chars, max_criteria=max_criteria)
            if max_tokens < need:
                raise ConfigError(f"max_tokens={max_tokens} is too small for the output grammar (analysis up to "
                                  f"{analysis_chars[1]} characters, up to {max_criteria} criteria needs about "  # type: ignore[index]
                                  f"{need} tokens); raise max_tokens or lower analysis_chars / max_criteria")
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p,
                                     grammar=grammar, digit_probs=self.expected_scores)
        self.prefix_cache = PrefixCache(prefix_cache_mb, prefix_cache_dir, prefix_cache_disk_mb)
        engine.prefix_cache = self.prefix_cache
        self._lock = threading.Lock()
        self._closed = False
        self._personas: dict[str, str] = {}

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, n_samples: int = 1, n_neighbors: int = 0,
                    device: str = "auto", seed: int = 0, n_ctx: int | None = None,
                    n_threads: int | None = None, verify: str = "size",
                    chat_template: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                    **options) -> "Scorer":
        """Open a bundle (verifying it first) and load its model, embedder and prototypes.

        Options not given here fall back to the bundle's recommended `defaults`, then to
        the output contract's and the Scorer's own defaults. `chat_template` (Jinja text or
        a path to a .jinja file) replaces the chat template of the bundle and of the GGUF file.
        `model`: a GGUF file loaded in place of the bundle's own, with all of the bundle's
        settings (e.g. a re-quantised copy under `python -m export check-quant`).
        """
        _check_counts(n_samples, n_neighbors)
        check_seed(seed)
        bundle = Bundle.open(path, verify=verify)  # type: ignore[arg-type]
        options = {**_known_defaults(bundle.manifest.defaults), **options}
        options["template"] = protocol.resolve_template(options.get("template") or bundle.manifest.template)
        max_tokens = options.get("max_tokens") or options["template"].output_contract.max_tokens
        if chat_template is None:
            chat_template = bundle.chat_template()
        llm_path = bundle.llm_path
        # The manifest's hash names the model in prompt-cache keys; another file is hashed itself.
        llm_entry = next((f for f in bundle.manifest.files if f.path == bundle.manifest.llm.file), None)
        model_id = f"{llm_entry.sha256}:{llm_entry.size}" if llm_entry else None
        if model is not None:
            llm_path, model_id = Path(model), None
            if not model_file_ok(llm_path):
                raise ConfigError(f"{llm_path} is not a readable GGUF v2/v3 file")
        engine = Engine(llm_path, n_ctx=n_ctx or _auto_n_ctx(n_samples + n_neighbors, max_tokens),
                        n_threads=n_threads, device=device, chat_template=_template_text(chat_template),
                        model_id=model_id)
        try:
            prototypes = None
            if n_neighbors > 0 and bundle.manifest.prototypes is not None:
                from .prototypes import PrototypeIndex

                prototypes = PrototypeIndex.from_bundle(bundle, device=device, n_threads=n_threads)
            return cls(engine, n_samples=n_samples, n_neighbors=n_neighbors, seed=seed,
                       prototypes=prototypes, bundle=bundle, **options)
        except BaseException:
            engine.close()
            raise

    @classmethod
    def default(cls, **kwargs) -> "Scorer":
        """The embedded default bundle (see `pgenrm_lite.defaults.default_bundle_dir`)."""
        from .defaults import default_bundle_dir
        from .errors import BundleError

        path = default_bundle_dir()
        if not is_bundle_dir(path):
            raise BundleError(f"no default bundle at {path}; build it with `python -m export default-bundle` "
                              "(or point PGENRM_LITE_BUNDLE at a bundle directory)")
        return cls.from_bundle(path, **kwargs)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, *, n_samples: int = 1, device: str = "auto", seed: int = 0,
                  n_ctx: int | None = None, n_threads: int | None = None, max_tokens: int | None = None,
                  chat_template: str | os.PathLike | None = None, **options) -> "Scorer":
        """A scorer on a bare GGUF file (no bundle, so no prototypes: n_neighbors stays 0).

        `chat_template` (Jinja text or a path to a .jinja file) replaces the file's own.
        """
        _check_counts(n_samples, 0)
        check_seed(seed)
        path = Path(path)
        if not model_file_ok(path):
            raise ConfigError(f"{path} is not a readable GGUF v2/v3 file")
        options["template"] = protocol.resolve_template(options.get("template"))
        max_tokens = max_tokens or options["template"].output_contract.max_tokens
        engine = Engine(path, n_ctx=n_ctx or _auto_n_ctx(n_samples, max_tokens), n_threads=n_threads,
                        device=device, chat_template=_template_text(chat_template))
        try:
            return cls(engine, n_samples=n_samples, seed=seed, max_tokens=max_tokens, **options)
        except BaseException:
            engine.close()
            raise

    def close(self) -> None:
        """Free the model and the index; waits for a call in progress. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.engine.close()
            if self.prototypes is not None:
                self.prototypes.close()

    @contextlib.contextmanager
    def _open_call(self):
        """The model lock, for a call on a scorer that must still be open."""
        with self._lock:
            if self._closed:
                raise ClosedError("this Scorer was closed; open a new one (Scorer.from_bundle / Scorer.default)")
            yield

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public calls ------------------------------------------------------------------

    def compare(self, user: UserProfile, prompt: str, response_a: str, response_b: str, *,
                seed: Optional[int] = None) -> CompareResult:
        """Which of two responses this user prefers, with both final scores and the chains."""
        _check_user(user)
        for name, text in (("prompt", prompt), ("response_a", response_a), ("response_b", response_b)):
            _check_text(name, text)
        seed = self.seed if seed is None else check_seed(seed)
        with self._open_call():
            return self._compare_pairs(user, prompt, [response_a, response_b], [(0, 1)], seed)[0]

    def score(self, user: UserProfile, prompt: str, responses: Sequence[str], *,
              seed: Optional[int] = None, method: GroupMethod = "mean") -> list[float]:
        """One reward per response (NaN where no comparison of it parsed): `score_group(...).rewards`.

        Every pair is compared (all pairs in one batch). `method="mean"` (default): a response
        scores the mean of its final scores over its pairs, on the chains' 0-10 scale; with two
        responses, the final scores of their comparison. `method="bradley_terry"`: centred
        strengths fitted to the pairs' verdicts (see `pgenrm_lite.group_rewards`).
        """
        return self.score_group(user, prompt, responses, seed=seed, method=method).rewards

    def score_group(self, user: UserProfile, prompt: str, responses: Sequence[str], *,
                    seed: Optional[int] = None, method: GroupMethod = "mean",
                    prior_sd: float = group_rewards.DEFAULT_PRIOR_SD) -> GroupScores:
        """Rewards with standard errors and every comparison behind them, for 2 to 16 responses."""
        _check_user(user)
        _check_text("prompt", prompt)
        group_rewards.check_method(method)
        if isinstance(responses, (str, bytes)) or not isinstance(responses, (list, tuple)):
            raise ConfigError(f"responses must be a list of strings, got {type(responses).__name__}"
                              + ("; wrap a single text in a list" if isinstance(responses, str) else ""))
        seed = self.seed if seed is None else check_seed(seed)
        responses = list(responses)
        if not 2 <= len(responses) <= MAX_RESPONSES:
            raise ConfigError(f"score() takes 2 to {MAX_RESPONSES} responses, got {len(responses)}; "
                              "for one response, compare it with a reference answer")
        for i, r in enumerate(responses):
            _check_text(f"responses[{i}]", r)
        pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
        with self._open_call():
            results = self._compare_pairs(user, prompt, responses, pairs, seed)
        shares = [group_rewards.win_share([(s.score_a, s.score_b, s.kind == "neighbor") for s in r.samples
                                           if s.score_a is not None and s.score_b is not None],
                                          c_self=self.c_self, c_nb=self.c_nb) for r in results]
        if method == "mean":
            rewards, stderr = group_rewards.mean_rewards(
                len(responses), [(i, j, r.score_a, r.score_b) for (i, j), r in zip(pairs, results)
                                 if r.score_a is not None and r.score_b is not None])
        else:
            rewards, stderr = group_rewards.bradley_terry(
                len(responses), [(i, j, y) for (i, j), y in zip(pairs, shares) if y is not None], prior_sd=prior_sd)
        return GroupScores(rewards=rewards, stderr=stderr, method=method,
                           prior_sd=prior_sd if method == "bradley_terry" else None, pairs=pairs,
                           win_share=shares, comparisons=results,
                           n_pairs_parsed=sum(r.score_a is not None for r in results), seed=seed,
                           n_samples=self.n_samples, n_neighbors=self.n_neighbors)

    def prompt(self, user: UserProfile, prompt: str, response_a: str, response_b: str, *,
               seed: Optional[int] = None, swapped: bool = False) -> tuple[list[dict], list[int]]:
        """The chat messages and prompt token ids of an own-history sample of `compare` (same seed:
        same history pairs, same fitting to the context), with A shown first unless `swapped`."""
        _check_user(user)
        for name, text in (("prompt", prompt), ("response_a", response_a), ("response_b", response_b)):
            _check_text(name, text)
        seed = self.seed if seed is None else check_seed(seed)
        with self._open_call():
            prep = self._prepare(user, prompt, response_a, response_b, seed)
        return prep.messages[swapped], list(prep.tokens[swapped])

    def add_user(self, profile: UserProfile, persona_text: Optional[str] = None) -> int:
        """Add (or replace) a prototype member on this device; the bundle's index is updated atomically.

        The persona embedded is `persona_text`, else `profile.persona`, else (for an index
        built from history text) the history text itself. Returns the member's prototype.
        """
        _check_user(profile)
        self._require_prototypes("add users")
        persona_text = persona_text or profile.persona
        if persona_text is None:
            if self.prototypes.persona_source != "history":
                raise ConfigError("this prototype index was built from LLM persona analyses; pass persona_text "
                                  "(e.g. the `analysis` of one of this user's chains)")
            persona_text = protocol.persona_from_history(profile)
        with self._open_call():
            return self.prototypes.add_user(profile, persona_text)

    def remove_user(self, user_id: str) -> int:
        """Forget a user on this device: their prototype members go from the bundle's index (atomically,
        old files deleted) and from the persona checkpoint beside it, and this scorer drops its cached
        persona and its prompt-prefix states for them (memory and disk). Returns how many member
        records were removed (0: they were not a member)."""
        if not isinstance(user_id, str) or not user_id:
            raise ConfigError(f"user_id must be a non-empty string, got {user_id!r}")
        if self.bundle is not None and self.bundle.manifest.prototypes is not None:
            self._require_prototypes("forget users")
        with self._open_call():
            self._personas.pop(user_id, None)
            self.prefix_cache.forget(user_id)
            return 0 if self.prototypes is None else self.prototypes.remove_user(user_id)

    # -- internals ---------------------------------------------------------------------

    def _owner(self, job: _Job) -> str:
        """The user whose history a job's prompt shows (a chain member's user), for the prefix cache."""
        if job.kind == "neighbor" and self.prototypes is not None:
            from .prototypes import member_owner

            return member_owner(job.owner.user_id, self.prototypes.info.granularity)
        return job.owner.user_id

    def _require_prototypes(self, what: str) -> None:
        with self._open_call():
            if self.prototypes is None and self.bundle is not None and self.bundle.manifest.prototypes:
                from .prototypes import PrototypeIndex

                # Loaded on first use: a scorer with n_neighbors=0 need not hold the embedder otherwise.
                self.prototypes = PrototypeIndex.from_bundle(self.bundle, device=self.engine.device,
                                                             n_threads=self.engine.n_threads)
        if self.prototypes is None:
            raise ConfigError(f"this scorer has no prototype index: load a bundle built with "
                              f"`python -m export prototypes` to {what}")

    def _compare_pairs(self, user: UserProfile, prompt: str, responses: list[str],
                       pairs: list[tuple[int, int]], seed: int) -> list[CompareResult]:
        t0 = time.perf_counter()
        prepared: dict[tuple[str, tuple[int, int]], _Prepared] = {}
        jobs = [_Job("self", user, pair, s, self._swapped(s, seed, pair))
                for pair in pairs
                for s in (protocol.derive_seed(seed, "self", i, pair) for i in range(self.n_samples))]
        notes: list[str] = []
        if user.stated_preferences and "{{stated_preferences}}" not in self.template.system:
            notes.append(f"the user's stated preferences were not shown: template {self.template.name!r} has no "
                         "{{stated_preferences}} slot")
        neighbors: list[tuple[UserProfile, float]] = []
        persona_from = None
        persona_ready = self.n_neighbors > 0 and self._persona_known(user)
        if persona_ready:
            persona, persona_from = self._persona_text(user, [], notes)
            neighbors = self._neighbors(user, persona, prompt)
            jobs += self._neighbor_jobs(neighbors, pairs, seed)
        outputs, stats = self._run(jobs, user, prompt, responses, seed, prepared)
        if self.n_neighbors > 0 and not persona_ready:
            chains = [o for j, o in zip(jobs, outputs) if o[0] is not None]
            persona, persona_from = self._persona_text(user, [c[0] for c in chains], notes)
            neighbors = self._neighbors(user, persona, prompt)
            nb_jobs = self._neighbor_jobs(neighbors, pairs, seed)
            nb_out, nb_stats = self._run(nb_jobs, user, prompt, responses, seed, prepared)
            jobs, outputs = jobs + nb_jobs, outputs + nb_out
            stats = _add_stats(stats, nb_stats)
        total = time.perf_counter() - t0
        return [self._result(pair, [(j, o) for j, o in zip(jobs, outputs) if j.pair == pair], neighbors,
                             prepared, seed, stats, total, notes, persona_from) for pair in pairs]

    def _run(self, jobs: list[_Job], user, prompt, responses, seed, prepared):
        """Generate every job's sample in one batched call; parse each."""
        if not jobs:
            return [], None
        by_tokens: dict[tuple[int, ...], list[int]] = {}
        owner_of: dict[tuple[int, ...], str] = {}
        for idx, job in enumerate(jobs):
            key = (job.owner.user_id if job.kind == "neighbor" else "\0self", job.pair)
            if key not in prepared:
                prepared[key] = self._prepare(job.owner, prompt, responses[job.pair[0]],
                                              responses[job.pair[1]], seed)
            by_tokens.setdefault(prepared[key].tokens[job.swapped], []).append(idx)
            owner_of[prepared[key].tokens[job.swapped]] = self._owner(job)
        prep_of = {prep.tokens[swapped]: prep for prep in prepared.values() for swapped in prep.tokens}
        requests = [Request(tokens, tuple(jobs[i].seed for i in idxs), prefix_len=prep_of[tokens].prefix_len,
                            owner=owner_of[tokens], shared_len=prep_of[tokens].shared_len)
                    for tokens, idxs in by_tokens.items()]
        completions, stats = self.engine.generate(requests, self.params)
        outputs: list = [None] * len(jobs)
        for idxs, comps in zip(by_tokens.values(), completions):
            for i, comp in zip(idxs, comps):
                try:
                    chain = protocol.parse_chain(comp.text)
                except ChainParseError as exc:
                    reason = str(exc) if comp.finish_reason == "stop" else f"{exc} (hit max_tokens)"
                    outputs[i] = (None, reason, comp.n_tokens, None)
                    continue
                expected = (protocol.expected_final_scores(comp.text, comp.digit_probs, comp.ten_probs)
                            if self.expected_scores else None)
                outputs[i] = (chain, None, comp.n_tokens, expected)
        return outputs, stats

    def _prepare(self, owner: UserProfile, prompt: str, first: str, second: str, seed: int) -> _Prepared:
        """Render both candidate orders for one history owner, fitting the context window."""
        budget = self.engine.n_ctx_seq - self.params.max_tokens
        chosen = protocol.select_history(owner.history, self.history_pairs,
                                         protocol.derive_seed(seed, "history", owner.user_id), self.history_order)
        min_pairs = min(1, len(chosen))
        attempts = [(n, None) for n in range(len(chosen), min_pairs - 1, -1)]
        attempts += [(min_pairs, chars) for chars in SHORTEN_STEPS]
        longest = 0
        for n_pairs, max_chars in attempts:
            tokens, messages = {}, {}
            for swapped in (False, True):
                r1, r2 = (second, first) if swapped else (first, second)
                messages[swapped] = protocol.render_messages(owner, prompt, r1, r2, template=self.template,
                                                             history=chosen[:n_pairs], max_field_chars=max_chars)
                tokens[swapped] = self.engine.chat_tokens(messages[swapped])
            longest = max(len(t) for t in tokens.values())
            if longest <= budget:
                policy = []
                if n_pairs < len(chosen):
                    policy.append(f"showed {n_pairs} of {len(chosen)} history pairs of {owner.user_id} "
                                  f"to fit n_ctx={self.engine.n_ctx} with max_tokens={self.params.max_tokens}")
                if max_chars is not None:
                    policy.append(f"shortened texts longer than {max_chars} characters (marked "
                                  "'[...truncated N characters]')")
                prefix_len = self.engine.cacheable_prefix(tokens[False], tokens[True])
                shared = min(common_prefix(tokens[False], tokens[True]), *(len(t) - 1 for t in tokens.values()))
                return _Prepared(tokens=tokens, messages=messages, history_shown=n_pairs, policy=tuple(policy),
                                 prefix_len=prefix_len, shared_len=shared if prefix_len and shared > prefix_len else 0)
        raise ContextOverflowError(
            f"even with {min_pairs} history pair(s) and every text shortened to {SHORTEN_STEPS[-1]} "
            f"characters the prompt takes {longest} tokens, and with max_tokens={self.params.max_tokens} "
            f"that exceeds the context of {self.engine.n_ctx}; load with a larger n_ctx or lower max_tokens",
            n_prompt_tokens=longest, max_tokens=self.params.max_tokens, n_ctx=self.engine.n_ctx)

    # -- prototype level ---------------------------------------------------------------

    def _persona_known(self, user: UserProfile) -> bool:
        cached = self.persona_mode == "cached" and user.user_id in self._personas
        return bool(user.persona) or cached or self.prototypes.persona_source == "history"

    def _persona_text(self, user: UserProfile, chains: list[EvaluationChain], notes: list[str]) -> tuple[str, str]:
        """(the text embedded to find similar users, where it came from), matched to how the index was built.

        A persona given in the profile wins; an index built from history text takes the
        history text; else the analysis of a parsed self chain: the first one ever parsed
        for the user ("cached") or this call's first ("query", the official pipeline).
        """
        if user.persona:
            return user.persona, "profile"
        if self.prototypes.persona_source == "history":
            return protocol.persona_from_history(user), "history"
        if self.persona_mode == "cached" and user.user_id in self._personas:
            return self._personas[user.user_id], "cache"
        analyses = [c.analysis for c in chains if c.analysis.strip()]
        if analyses:
            if self.persona_mode == "cached":
                self._personas[user.user_id] = analyses[0]
            return analyses[0], "chain"
        notes.append("no parsed self chain to take a persona from; looked up neighbours by the "
                     "history text instead")
        return protocol.persona_from_history(user), "history-fallback"

    def _neighbors(self, user: UserProfile, persona: str, prompt: str) -> list[tuple[UserProfile, float]]:
        # history and query place the user in a refined index; an unrefined one ignores them
        return self.prototypes.neighbors(persona, self.n_neighbors, exclude=user.user_id, history=user.history,
                                         query=prompt)

    def _neighbor_jobs(self, neighbors, pairs, seed) -> list[_Job]:
        jobs = []
        for w, (member, sim) in enumerate(neighbors):
            for pair in pairs:
                s = protocol.derive_seed(seed, "neighbor", w, pair)
                jobs.append(_Job("neighbor", member, pair, s, self._swapped(s, seed, pair), sim))
        return jobs

    def _swapped(self, sample_seed: int, seed: int, pair: tuple[int, int]) -> bool:
        """Whether Response 1 shows the pair's second candidate: drawn per sample, or once per item."""
        if self.candidate_order == "item":
            return protocol.is_swapped(protocol.derive_seed(seed, "item-order", pair))
        return protocol.is_swapped(sample_seed)

    # -- results -----------------------------------------------------------------------

    def _result(self, pair, items, neighbors, prepared, seed, stats, total, notes, persona_from=None) -> CompareResult:
        samples, chains = [], []
        self_scores, nb_scores = [], []
        nb_by_user: dict[str, list] = {}
        n_sampled_fallback = 0
        for job, (chain, error, n_tokens, expected) in items:
            ab, readout = None, "sampled"
            if chain is not None:
                if expected is not None:
                    ab, readout = ((expected[1], expected[0]) if job.swapped else expected), "expected"
                else:
                    n_sampled_fallback += self.expected_scores
                    ab = protocol.scores_for_candidates(chain, job.swapped)
            samples.append(Sample(kind=job.kind, user_id=job.owner.user_id, seed=job.seed, swapped=job.swapped,
                                  n_tokens=n_tokens, chain=chain, error=error, readout=readout,
                                  score_a=ab[0] if ab else None, score_b=ab[1] if ab else None))
            if chain is not None:
                chains.append(chain)
            (self_scores if job.kind == "self" else nb_scores).append(ab)
            if job.kind == "neighbor":
                nb_by_user.setdefault(job.owner.user_id, []).append(ab)
        final = scaling.combine(self_scores, nb_scores, c_self=self.c_self, c_nb=self.c_nb)
        score_a, score_b = final if final is not None else (None, None)
        sims = {m.user_id: s for m, s in neighbors}
        nb_records = []
        for uid, scores in nb_by_user.items():
            m = scaling.mean_pair(scores)
            nb_records.append(NeighborScore(user_id=uid, similarity=sims.get(uid, 0.0),
                                            score_a=m[0] if m else None, score_b=m[1] if m else None))
        self_prep = prepared.get(("\0self", pair))
        policy = list(self_prep.policy) if self_prep else []
        for key, prep in prepared.items():
            if key[0] != "\0self" and key[1] == pair:
                policy.extend(prep.policy)
        if n_sampled_fallback:
            notes = list(notes) + [f"{n_sampled_fallback} parsed chain(s) had no digit distributions for their "
                                   "final scores (not in the grammar's form); their sampled scores were used"]
        n_parsed = sum(1 for s in samples if s.chain is not None)
        confidence = _confidence(samples, with_prototype=self.n_neighbors > 0)
        preferred, abstained = scaling.decide(score_a, score_b), False
        if preferred is not None and self.min_confidence is not None:
            share = confidence.overall.prefer_a if preferred == "a" else confidence.overall.prefer_b
            if share is None or share < self.min_confidence:
                notes = list(notes) + [f"abstained: {share or 0:.0%} of the parsed chains prefer {preferred}, "
                                       f"below min_confidence={self.min_confidence:g}"]
                preferred, abstained = None, True
        return CompareResult(
            preferred=preferred, abstained=abstained, confidence=confidence,  # type: ignore[arg-type]
            score_a=score_a, score_b=score_b, chains=chains,
            samples=samples, n_parsed=n_parsed, n_failed=len(samples) - n_parsed, seed=seed,
            n_samples=self.n_samples, n_neighbors=self.n_neighbors, c_self=self.c_self, c_nb=self.c_nb,
            expected_scores=self.expected_scores, contract=self.contract.name,
            candidate_order=self.candidate_order, history_order=self.history_order,  # type: ignore[arg-type]
            temperature=self.params.temperature, max_tokens=self.params.max_tokens, constrained=self.constrained,
            neighbors=nb_records, history_shown=self_prep.history_shown if self_prep else 0,
            persona_mode=self.persona_mode if self.n_neighbors > 0 else None, persona_from=persona_from,  # type: ignore[arg-type]
            context_policy=policy, notes=list(notes) + (stats.notes if stats else []),
            timing=Timing(prompt_s=stats.prompt_s, decode_s=stats.decode_s, total_s=total,
                          n_prompt_tokens=stats.n_prompt_tokens, n_generated_tokens=stats.n_generated_tokens,
                          n_groups=stats.n_groups, n_cached_tokens=stats.n_cached_tokens,
                          cache_hits=stats.cache_hits, cache_misses=stats.cache_misses,
                          cache_evicted=stats.cache_evicted) if stats else Timing(total_s=total))


def _confidence(samples: list[Sample], *, with_prototype: bool) -> Confidence:
    """Per-level confidence from the parsed samples' scores and the order each saw."""
    def level(*kinds: str) -> LevelConfidence:
        return LevelConfidence(**scaling.level_confidence(
            [((s.score_a, s.score_b), s.swapped) for s in samples
             if s.kind in kinds and s.score_a is not None and s.score_b is not None]))

    return Confidence(overall=level("self", "neighbor"), individual=level("self"),
                      prototype=level("neighbor") if with_prototype else None)


def _add_stats(a, b):
    if a is None:
        return b
    if b is None:
        return a
    a.prompt_s += b.prompt_s
    a.decode_s += b.decode_s
    a.n_prompt_tokens += b.n_prompt_tokens
    a.n_generated_tokens += b.n_generated_tokens
    a.n_groups += b.n_groups
    a.n_cached_tokens += b.n_cached_tokens
    a.cache_hits += b.cache_hits
    a.cache_misses += b.cache_misses
    a.cache_evicted += b.cache_evicted
    a.notes.extend(b.notes)
    return a


_TUNABLE = ("max_tokens", "temperature", "top_p", "min_p", "history_pairs", "c_self", "c_nb",
            "analysis_chars", "rationale_chars", "max_criteria", "expected_scores", "constrained",
            "history_order", "candidate_order", "min_confidence", "persona_mode", "prefix_cache_mb")
_INT_OPTIONS = ("max_tokens", "history_pairs", "max_criteria", "rationale_chars")
_STR_OPTIONS = ("history_order", "candidate_order", "persona_mode")


def _known_defaults(defaults: dict) -> dict:
    """The bundle's recommended options that the Scorer understands (others are ignored).

    The manifest is data: a value of the wrong type is a `BundleError` naming the option.
    """
    from .errors import BundleError

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and abs(v) < 1 << 31

    out = {k: v for k, v in defaults.items() if k in _TUNABLE}
    for k, v in out.items():
        if k in ("expected_scores", "constrained"):
            ok = isinstance(v, bool)
        elif k in _STR_OPTIONS:
            ok = isinstance(v, str)
        elif k == "analysis_chars":
            ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(x) for x in v)
        elif k in _INT_OPTIONS:
            ok = is_int(v)
        else:
            ok = is_int(v) or isinstance(v, float) and math.isfinite(v)
        if not ok:
            raise BundleError(f"the manifest's recommended option {k!r} has the wrong type ({type(v).__name__}); "
                              "fix the bundle's manifest 'defaults' or rebuild the bundle")
    if "analysis_chars" in out:
        out["analysis_chars"] = tuple(out["analysis_chars"])
    return out


def _template_text(chat_template: str | os.PathLike | None) -> str | None:
    """A chat template given as Jinja text or as a path to a file holding it."""
    if chat_template is None:
        return None
    if isinstance(chat_template, os.PathLike) or ("{" not in chat_template and len(chat_template) < 4096):
        path = Path(chat_template)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"chat_template={str(chat_template)!r} is neither Jinja template text nor a "
                              f"readable UTF-8 file ({exc})") from exc
    return chat_template


def _auto_n_ctx(n_sequences: int, max_tokens: int) -> int:
    """Room for a long prompt plus every sample's budget, rounded up to 256, capped at 32k."""
    need = 4096 + max(1, n_sequences) * max_tokens
    return min(32768, (need + 255) // 256 * 256)


def check_seed(seed: object) -> int:
    """The seed if a result can record it (an integer in 0..2**64-1), else a ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to 2**64-1 (what a result records), got {seed!r}")
    return seed


def _check_counts(n_samples: object, n_neighbors: object) -> None:
    for name, n in (("n_samples", n_samples), ("n_neighbors", n_neighbors)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise ConfigError(f"{name} must be an integer, got {n!r}")
    if n_samples < 0 or n_neighbors < 0 or n_samples + n_neighbors == 0:  # type: ignore[operator]
        raise ConfigError(f"n_samples={n_samples}, n_neighbors={n_neighbors}: both must be >= 0 "
                          "and at least one > 0")


def _check_user(user: UserProfile) -> None:
    if not isinstance(user, UserProfile):
        raise ConfigError(f"user must be a UserProfile, got {type(user).__name__}; build one with "
                          "UserProfile(user_id=..., history=[Preference(...), ...])")


def _check_text(name: str, text: object) -> None:
    from .records import MAX_TEXT_CHARS

    if not isinstance(text, str):
        raise ConfigError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"{name} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not text llama.cpp can tokenize
        raise ConfigError(f"{name} is not valid Unicode: a lone surrogate at character {exc.start}; "
                          "decode the text properly (e.g. errors='replace')") from exc
