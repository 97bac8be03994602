"""The `Scorer` facade: personalised rewards for one user, with test-time user-based scaling.

It composes the pieces: `options` holds the settings, `prompt_fitting` renders and fits the
prompts, `sample_jobs` draws all samples of a call in one engine batch, `prototype_level`
chooses the persona that finds similar users in the prototype index, and `result_assembly`
applies the scaling formula. One Scorer may be shared by threads; calls are serialised.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence

from . import contracts, group_rewards, model_loading, protocol, sample_jobs
from .bundle import Bundle, is_bundle_dir
from .engine import Engine, SamplingParams
from .errors import ClosedError, ConfigError
from .group_rewards import GroupMethod
from .options import ScorerOptions, check_seed
from .prefix_cache import PrefixCache
from .prompt_fitting import PreparedPrompts, fit_prompts, unshown_preferences_notes
from .prototype_level import PersonaChoice, find_neighbors, job_cache_owner, persona_to_add
from .records import CompareResult, GroupScores, UserProfile
from .result_assembly import CallRecord, assemble_group, assemble_result, combine_stats
from .sample_jobs import Pair, PromptKey, SampleJob

MAX_RESPONSES = 16  # score() compares all pairs: k(k-1)/2 pairs

OptionsArg = Optional["ScorerOptions | Mapping[str, Any]"]


class _Option:
    """A read-only attribute holding the scorer's resolved option of the same name (`scorer.n_samples`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, scorer: Any, owner: type | None = None) -> Any:
        return self if scorer is None else getattr(scorer.options, self.name)


class Scorer:
    """Scores candidate responses for one user with a P-GenRM model.

    Build it with `Scorer.from_bundle(path, ...)` or `Scorer.from_gguf(path, ...)`. Its options
    (`ScorerOptions`: a model or keyword arguments) say how: `n_samples` (m) chains are drawn
    with the user's own history and `n_neighbors` (n) with the histories of the most similar
    prototype members; see `scaling`.
    """

    n_samples, n_neighbors, seed, history_pairs, c_self, c_nb = (_Option() for _ in range(6))
    history_order, candidate_order, constrained, expected_scores, min_confidence, persona_mode = (
        _Option() for _ in range(6))

    def __init__(self, engine: Engine, options: OptionsArg = None, *, template=None, prototypes=None,
                 bundle: Bundle | None = None, **kwargs: Any):
        """`options` and keyword arguments (which win) are `ScorerOptions` fields; those left as None
        take the output contract's defaults (see `contracts.CONTRACTS`): the template names its
        contract, structured (the default) or official."""
        given = ScorerOptions.merge(options, kwargs)
        if given.n_neighbors > 0 and prototypes is None:
            raise ConfigError("n_neighbors > 0 needs a prototype index, and this bundle has none; build "
                              "one with `python -m export prototypes --bundle DIR ...` or set n_neighbors=0")
        self.template = protocol.resolve_template(template)
        self.contract = self.template.output_contract
        self.options = given.resolve(self.contract)
        self.params = sampling_params(self.options, self.contract)
        self.engine, self.bundle, self.prototypes = engine, bundle, prototypes
        self.prefix_cache = PrefixCache(self.options.prefix_cache_mb, self.options.prefix_cache_dir,
                                        self.options.prefix_cache_disk_mb)
        engine.prefix_cache = self.prefix_cache
        self.personas = PersonaChoice(self.options.persona_mode)
        self._lock = threading.Lock()
        self._closed = False

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, options: OptionsArg = None, *, device: str = "auto",
                    n_ctx: int | None = None, n_threads: int | None = None, verify: str = "size",
                    chat_template: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
                    template=None, **kwargs: Any) -> "Scorer":
        """Open a bundle (verifying it first) and load its model, embedder and prototypes.

        Options not given here (in `options` or as keyword arguments) fall back to the bundle's
        recommended `defaults`, then to the output contract's and the Scorer's own defaults.
        `chat_template` (Jinja text or a path to a .jinja file) replaces the chat template of
        the bundle and of the GGUF file. `model`: a GGUF file loaded in place of the bundle's
        own, with all of the bundle's settings (e.g. a re-quantised copy under
        `python -m export check-quant`).
        """
        given = ScorerOptions.merge(options, kwargs)  # bad options are refused before any file is read
        loaded = model_loading.open_bundle(path, given, make_engine=Engine, device=device, n_ctx=n_ctx,
                                           n_threads=n_threads, verify=verify, chat_template=chat_template,
                                           model=model, template=template)
        return cls._from_loaded(loaded)

    @classmethod
    def default(cls, options: OptionsArg = None, **kwargs: Any) -> "Scorer":
        """The embedded default bundle (see `pgenrm_lite.defaults.default_bundle_dir`)."""
        from .defaults import default_bundle_dir
        from .errors import BundleError

        path = default_bundle_dir()
        if not is_bundle_dir(path):
            raise BundleError(f"no default bundle at {path}; build it with `python -m export default-bundle` "
                              "(or point PGENRM_LITE_BUNDLE at a bundle directory)")
        return cls.from_bundle(path, options, **kwargs)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, options: OptionsArg = None, *, device: str = "auto",
                  n_ctx: int | None = None, n_threads: int | None = None,
                  chat_template: str | os.PathLike | None = None, template=None, **kwargs: Any) -> "Scorer":
        """A scorer on a bare GGUF file (no bundle, so no prototypes: n_neighbors stays 0).

        `chat_template` (Jinja text or a path to a .jinja file) replaces the file's own.
        """
        given = ScorerOptions.merge(options, kwargs)
        loaded = model_loading.open_gguf(path, given, make_engine=Engine, device=device, n_ctx=n_ctx,
                                         n_threads=n_threads, chat_template=chat_template, template=template)
        return cls._from_loaded(loaded)

    @classmethod
    def _from_loaded(cls, loaded: model_loading.Loaded) -> "Scorer":
        try:
            return cls(loaded.engine, loaded.options, template=loaded.template, prototypes=loaded.prototypes,
                       bundle=loaded.bundle)
        except BaseException:
            loaded.close()
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
        _check_pair_call(user, prompt, response_a, response_b)
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
        responses = _checked_responses(responses)
        seed = self.seed if seed is None else check_seed(seed)
        pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
        with self._open_call():
            results = self._compare_pairs(user, prompt, responses, pairs, seed)
        return assemble_group(pairs, results, len(responses), method=method, prior_sd=prior_sd,
                              options=self.options, seed=seed)

    def prompt(self, user: UserProfile, prompt: str, response_a: str, response_b: str, *,
               seed: Optional[int] = None, swapped: bool = False) -> tuple[list[dict], list[int]]:
        """The chat messages and prompt token ids of an own-history sample of `compare` (same seed:
        same history pairs, same fitting to the context), with A shown first unless `swapped`."""
        _check_pair_call(user, prompt, response_a, response_b)
        seed = self.seed if seed is None else check_seed(seed)
        with self._open_call():
            prepared = self._prepare(user, prompt, response_a, response_b, seed)
        return prepared.messages[swapped], list(prepared.tokens[swapped])

    def add_user(self, profile: UserProfile, persona_text: Optional[str] = None) -> int:
        """Add (or replace) a prototype member on this device; the bundle's index is updated atomically.

        The persona embedded is `persona_text`, else `profile.persona`, else (for an index
        built from history text) the history text itself. Returns the member's prototype.
        """
        _check_user(profile)
        self._require_prototypes("add users")
        persona_text = persona_to_add(profile, persona_text, self.prototypes.persona_source)
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
            self.personas.forget(user_id)
            self.prefix_cache.forget(user_id)
            return 0 if self.prototypes is None else self.prototypes.remove_user(user_id)

    # -- internals ---------------------------------------------------------------------

    def _require_prototypes(self, what: str) -> None:
        with self._open_call():
            if self.prototypes is None:  # loaded on first use: n_neighbors=0 need not hold the embedder
                self.prototypes = model_loading.bundled_prototypes(self.bundle, self.engine)
        if self.prototypes is None:
            raise ConfigError(f"this scorer has no prototype index: load a bundle built with "
                              f"`python -m export prototypes` to {what}")

    def _compare_pairs(self, user: UserProfile, prompt: str, responses: list[str], pairs: list[Pair],
                       seed: int) -> list[CompareResult]:
        """Draw every sample of a call and assemble one result per pair.

        When the persona that finds the neighbours is known beforehand, the own and the
        neighbours' samples run in one batch; else the own samples run first and their chains'
        analysis finds the neighbours (see `prototype_level`).
        """
        started = time.perf_counter()
        options = self.options
        notes = unshown_preferences_notes(self.template, user)
        prompts: dict[PromptKey, PreparedPrompts] = {}
        jobs = sample_jobs.self_jobs(user, pairs, options.n_samples, seed, options.candidate_order)  # type: ignore[arg-type]
        neighbors: list[tuple[UserProfile, float]] = []
        persona_from = None
        persona_first = options.n_neighbors > 0 and self.personas.known_before_sampling(
            user, self.prototypes.persona_source)
        if persona_first:
            neighbors, persona_from = find_neighbors(self.prototypes, self.personas, user, prompt,
                                                     options.n_neighbors, [], notes)
            jobs += sample_jobs.neighbor_jobs(neighbors, pairs, seed, options.candidate_order)  # type: ignore[arg-type]
        outputs, stats = self._draw(jobs, prompt, responses, seed, prompts)
        if options.n_neighbors > 0 and not persona_first:
            own_chains = [output.chain for output in outputs if output.chain is not None]
            neighbors, persona_from = find_neighbors(self.prototypes, self.personas, user, prompt,
                                                     options.n_neighbors, own_chains, notes)
            more_jobs = sample_jobs.neighbor_jobs(neighbors, pairs, seed, options.candidate_order)  # type: ignore[arg-type]
            more_outputs, more_stats = self._draw(more_jobs, prompt, responses, seed, prompts)
            jobs, outputs = jobs + more_jobs, outputs + more_outputs
            stats = combine_stats(stats, more_stats)
        call = CallRecord(options=options, contract=self.contract.name, seed=seed, neighbors=neighbors,
                          prompts=prompts, stats=stats, total_s=time.perf_counter() - started, notes=tuple(notes),
                          persona_from=persona_from)
        return [assemble_result(pair, [(job, output) for job, output in zip(jobs, outputs) if job.pair == pair], call)
                for pair in pairs]

    def _draw(self, jobs: list[SampleJob], prompt: str, responses: list[str], seed: int,
              prompts: dict[PromptKey, PreparedPrompts]):
        """Fit the prompts of each (history owner, pair) not yet in `prompts`, then draw the jobs in one batch."""
        for job in jobs:
            if job.prompt_key not in prompts:
                first, second = responses[job.pair[0]], responses[job.pair[1]]
                prompts[job.prompt_key] = self._prepare(job.owner, prompt, first, second, seed)
        return sample_jobs.draw(self.engine, self.params, jobs, prompts,
                                lambda job: job_cache_owner(job, self.prototypes), self.options.expected_scores)

    def _prepare(self, owner: UserProfile, prompt: str, first: str, second: str, seed: int) -> PreparedPrompts:
        """Render both candidate orders for one history owner, fitting the context window."""
        return fit_prompts(self.engine, self.template, owner, prompt, first, second, seed=seed,
                           history_pairs=self.options.history_pairs, history_order=self.options.history_order,  # type: ignore[arg-type]  # resolved: not None
                           max_tokens=self.params.max_tokens)


def sampling_params(options: ScorerOptions, contract: contracts.Contract) -> SamplingParams:
    """The engine's sampling settings for resolved options; refuses a max_tokens the output grammar
    cannot finish in."""
    grammar = None
    if options.constrained:
        grammar = contracts.grammar_for(contract, analysis_chars=options.analysis_chars,
                                        max_criteria=options.max_criteria, rationale_chars=options.rationale_chars)
        need = contracts.token_need(contract, analysis_chars=options.analysis_chars,
                                    max_criteria=options.max_criteria)
        if options.max_tokens < need:  # type: ignore[operator]
            raise ConfigError(f"max_tokens={options.max_tokens} is too small for the output grammar (analysis up "
                              f"to {options.analysis_chars[1]} characters, up to {options.max_criteria} criteria "  # type: ignore[index]
                              f"needs about {need} tokens); raise max_tokens or lower analysis_chars / max_criteria")
    return SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature,  # type: ignore[arg-type]
                          top_p=options.top_p, min_p=options.min_p, grammar=grammar,
                          digit_probs=options.expected_scores)


def _checked_responses(responses: object) -> list[str]:
    """The responses of `score_group` as a list, if it is a list of 2 to MAX_RESPONSES texts."""
    if isinstance(responses, (str, bytes)) or not isinstance(responses, (list, tuple)):
        raise ConfigError(f"responses must be a list of strings, got {type(responses).__name__}"
                          + ("; wrap a single text in a list" if isinstance(responses, str) else ""))
    if not 2 <= len(responses) <= MAX_RESPONSES:
        raise ConfigError(f"score() takes 2 to {MAX_RESPONSES} responses, got {len(responses)}; "
                          "for one response, compare it with a reference answer")
    for i, text in enumerate(responses):
        _check_text(f"responses[{i}]", text)
    return list(responses)


def _check_pair_call(user: UserProfile, prompt: str, response_a: str, response_b: str) -> None:
    _check_user(user)
    for name, text in (("prompt", prompt), ("response_a", response_a), ("response_b", response_b)):
        _check_text(name, text)


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
