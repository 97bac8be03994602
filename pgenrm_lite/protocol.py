"""All P-GenRM knowledge in one place: the prompt template, the output grammar, chain parsing.

Pure functions, no model. The layout follows the published checkpoints (DESIGN section 2):
a system message holding the user's history between fixed markers and the output
contract, a user message holding the query and the two candidates, and an answer made of
free-text analysis (PART 1) then `<JSON_START>` + one JSON object + `<JSON_END>` (PART 2).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import orjson

from . import contracts
from .contracts import (DEFAULT_MAX_CRITERIA, JSON_END, JSON_START, NAME_PATTERN,  # noqa: F401 (re-exported)
                        Contract, get_contract)
from .errors import ChainParseError, ConfigError
from .records import Criterion, EvaluationChain, Preference, UserProfile

DEFAULT_HISTORY_PAIRS = 3  # the paper's ablation peaks at three pairs
TRUNCATION_MARK = " [...truncated {n} characters]"

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_REQUIRED = {
    "system": {"history"},
    "user": {"query", "response_1", "response_2"},
    "history_entry": {"prompt", "chosen", "rejected"},
    "stated_preferences": {"stated_preferences"},
}
_ALLOWED = {
    "system": {"history", "stated_preferences"},
    "user": {"query", "response_1", "response_2"},
    "history_entry": {"prompt", "chosen", "rejected"},
    "stated_preferences": {"stated_preferences"},
}


@dataclass(frozen=True)
class Template:
    """The prompt layout as data: `{{name}}` placeholders, filled by substitution only."""

    system: str
    user: str
    history_entry: str
    stated_preferences: str
    name: str = "custom"
    contract: str = "structured"  # the output contract the model answers in (see contracts.py)

    @property
    def output_contract(self) -> Contract:
        return get_contract(self.contract)

    def __post_init__(self) -> None:
        get_contract(self.contract)
        for part, required in _REQUIRED.items():
            found = set(_PLACEHOLDER.findall(getattr(self, part)))
            missing = required - found
            unknown = found - _ALLOWED[part]
            if missing:
                raise ConfigError(f"template part '{part}' lacks placeholder(s) "
                                  f"{sorted('{{' + m + '}}' for m in missing)}; add them")
            if unknown:
                raise ConfigError(f"template part '{part}' has unknown placeholder(s) "
                                  f"{sorted('{{' + u + '}}' for u in unknown)}; allowed: "
                                  f"{sorted('{{' + a + '}}' for a in _ALLOWED[part])}")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "template") -> "Template":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a template is a JSON object with keys system, user, "
                              "history_entry, stated_preferences")
        missing = [k for k in ("system", "user", "history_entry", "stated_preferences") if k not in data]
        if missing:
            raise ConfigError(f"{source}: template lacks key(s) {missing}")
        bad = [k for k in ("system", "user", "history_entry", "stated_preferences", "name", "contract")
               if k in data and not isinstance(data[k], str)]
        if bad:
            raise ConfigError(f"{source}: template key(s) {bad} must be strings")
        if data.get("contract", "structured") not in contracts.CONTRACTS:
            raise ConfigError(f"{source}: template key 'contract' is {data['contract']!r}; "
                              f"known contracts: {sorted(contracts.CONTRACTS)}")
        return cls(system=data["system"], user=data["user"], history_entry=data["history_entry"],
                   stated_preferences=data["stated_preferences"], name=data.get("name", "custom"),
                   contract=data.get("contract", "structured"))

    @classmethod
    def load(cls, path: str | Path) -> "Template":
        """Load a template file (JSON with keys system, user, history_entry, stated_preferences)."""
        path = Path(path)
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(f"template file {path} does not exist") from exc
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"template file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "contract": self.contract, "system": self.system, "user": self.user,
                "history_entry": self.history_entry, "stated_preferences": self.stated_preferences}


def default_template() -> Template:
    raw = resources.files("pgenrm_lite").joinpath("templates/default.json").read_bytes()
    return Template.from_dict(orjson.loads(raw), source="default template")


def resolve_template(template: Template | str | Path | dict | None) -> Template:
    if template is None:
        return default_template()
    if isinstance(template, Template):
        return template
    if isinstance(template, dict):
        return Template.from_dict(template)
    return Template.load(template)


def _fill(text: str, values: dict[str, str]) -> str:
    # One pass: substituted values are never scanned for placeholders again.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


# -- input hygiene ----------------------------------------------------------------------

_MARKERS = re.compile(r"<(/?)(JSON_(?:START|END))>|\[(The (?:Start|End) of)", re.IGNORECASE)


def neutralise(text: str) -> str:
    """Defuse the protocol's own markers inside untrusted text (history, query, candidates).

    `<JSON_START>` becomes `<JSON START>` and `[The End of ...` becomes `(The End of ...`,
    so a candidate cannot close its block early or plant a verdict for the parser.
    """
    def repl(m: re.Match) -> str:
        if m.group(2):
            return f"<{m.group(1)}{m.group(2).replace('_', ' ')}>"
        return f"({m.group(3)}"
    return _MARKERS.sub(repl, text)


def truncate(text: str, max_chars: int | None) -> str:
    """Cut `text` to about `max_chars`, keeping head and tail, with a visible marker."""
    if max_chars is None or len(text) <= max_chars:
        return text
    keep = max(0, max_chars)
    head, tail = text[: keep * 3 // 4], text[len(text) - keep // 4:] if keep // 4 else ""
    return head + TRUNCATION_MARK.format(n=len(text) - len(head) - len(tail)) + tail


# -- seeded choices ---------------------------------------------------------------------

def derive_seed(seed: int, *parts: object) -> int:
    """A 32-bit seed from a base seed and labels; stable across runs and platforms."""
    h = hashlib.blake2b(repr((int(seed),) + parts).encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


def select_history(history: Sequence[Preference], k: int, seed: int,
                   order: contracts.HistoryOrder = "original") -> list[Preference]:
    """Up to `k` pairs drawn without replacement (seeded).

    order="original" keeps them in the user's order; "sampled" keeps the order they were
    drawn in (the official pipeline's `random.sample`).
    """
    if k < 0:
        raise ConfigError(f"history pair count must be >= 0, got {k}")
    if order not in ("original", "sampled"):
        raise ConfigError(f"history_order must be 'original' or 'sampled', got {order!r}")
    if len(history) <= k and order == "original":
        return list(history)
    idx = random.Random(derive_seed(seed, "history")).sample(range(len(history)), min(k, len(history)))
    return [history[i] for i in (sorted(idx) if order == "original" else idx)]


def is_swapped(seed: int) -> bool:
    """Whether response B is shown first for a sample with this seed."""
    return bool(derive_seed(seed, "order") & 1)


# -- rendering --------------------------------------------------------------------------

def render_messages(user: UserProfile, prompt: str, response_1: str, response_2: str, *,
                    template: Template | str | Path | dict | None = None,
                    history: Sequence[Preference] | None = None,
                    max_field_chars: int | None = None) -> list[dict]:
    """The chat messages (system, user) for one evaluation, exactly in the protocol's layout.

    `history` is the list of pairs to show (default: all of `user.history`; the Scorer
    passes a seeded selection). `max_field_chars` shortens every untrusted text field.
    """
    t = resolve_template(template)
    shown = user.history if history is None else history

    def clean(s: str) -> str:
        return truncate(neutralise(s), max_field_chars)

    block = "".join(_fill(t.history_entry, {"prompt": clean(p.prompt), "chosen": clean(p.chosen),
                                            "rejected": clean(p.rejected)}) for p in shown)
    stated = ""
    if user.stated_preferences:
        stated = _fill(t.stated_preferences, {"stated_preferences": clean(user.stated_preferences)})
    system = _fill(t.system, {"history": block, "stated_preferences": stated})
    user_msg = _fill(t.user, {"query": clean(prompt), "response_1": clean(response_1),
                              "response_2": clean(response_2)})
    return [{"role": "system", "content": system}, {"role": "user", "content": user_msg}]


# -- parsing ----------------------------------------------------------------------------

_NUMBER_STR = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(?:/\s*10)?\s*%?\s*$")


def _as_number(value: Any, what: str, raw: str) -> float:
    if isinstance(value, bool) or value is None:
        raise ChainParseError(f"{what} is {value!r}, not a number", raw)
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = _NUMBER_STR.match(value)
        if not m:
            raise ChainParseError(f"{what} is {value!r}, not a number", raw)
        x = float(m.group(1))
    else:
        raise ChainParseError(f"{what} is a {type(value).__name__}, not a number", raw)
    if not math.isfinite(x):
        raise ChainParseError(f"{what} is not finite ({value!r})", raw)
    return x


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _lookup(obj: dict, *names: str) -> Any:
    wanted = {_norm_key(n) for n in names}
    for k, v in obj.items():
        if isinstance(k, str) and _norm_key(k) in wanted:
            return v
    return None


def _json_block(text: str) -> tuple[str, str]:
    """(analysis, json text) from the last `<JSON_START>` ... `<JSON_END>` block."""
    start = text.rfind(JSON_START)
    if start < 0:
        raise ChainParseError(f"no {JSON_START} marker: the output has no JSON block", text)
    end = text.find(JSON_END, start)
    if end < 0:
        raise ChainParseError(f"{JSON_START} is never closed by {JSON_END}", text)
    body = text[start + len(JSON_START): end].strip()
    if body.startswith("```"):
        body = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", body)
    return text[:start].strip(), body


def _load_object(body: str, raw: str) -> dict:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        i, j = body.find("{"), body.rfind("}")
        try:
            obj = orjson.loads(body[i: j + 1]) if 0 <= i < j else None
        except orjson.JSONDecodeError:
            obj = None
        if obj is None:
            raise ChainParseError("the JSON block is not valid JSON", raw) from None
    if not isinstance(obj, dict):
        raise ChainParseError("the JSON block is not an object", raw)
    return obj


def _criteria(rationale: Any, raw: str) -> list[Criterion]:
    """Criteria from a structured rationale (an object with a "criteria" list) or an official string one."""
    if isinstance(rationale, str):
        return criteria_from_text(rationale)
    items = rationale.get("criteria") if isinstance(rationale, dict) else None
    if not isinstance(items, list):
        return []
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        name = item.get("name") or item.get("criterion") or f"criterion {i + 1}"
        weight = _lookup(item, "weight")
        s1, s2 = _lookup(item, "response_1", "response1"), _lookup(item, "response_2", "response2")
        w = _as_number(weight, f"criterion {i + 1} weight", raw) if weight is not None else 0.0
        out.append(Criterion(
            name=str(name)[:200], weight=w, raw_weight=w,
            scores=(_as_number(s1, f"criterion {i + 1} response_1 score", raw) if s1 is not None else None,
                    _as_number(s2, f"criterion {i + 1} response_2 score", raw) if s2 is not None else None)))
    return out


def _normalised(criteria: list[Criterion]) -> tuple[list[Criterion], float | None]:
    """Weights scaled to sum to 100 (the written ones kept as `raw_weight`), and the written sum."""
    if not criteria:
        return criteria, None
    total = sum(c.raw_weight or 0.0 for c in criteria)
    if total <= 0:
        return criteria, total
    return [c.model_copy(update={"weight": (c.raw_weight or 0.0) * 100.0 / total}) for c in criteria], total


# The official rationale in prose: "A. Evaluation Criteria & Weights" naming each criterion
# with a percentage, then "B. Scoring Breakdown" per response, then the final computation.
_BULLET = r"(?:^|\n|[,;][ \t]*)[ \t]*(?:[-*\u2022]|\d{1,2}[.)]|[A-Za-z][.)])?[ \t]*"
_CRITERION_WEIGHT = re.compile(
    _BULLET + r"\**(?P<name>[A-Za-z][A-Za-z0-9 &/,'\-]{0,60}?)\**[ \t]*"
    r"(?:\(\s*(?:weight\s*[:=]?\s*)?(?P<w1>\d{1,3}(?:\.\d+)?)\s*%\s*\)"
    r"|[:\-\u2013]\s*(?:weight\s*[:=]?\s*)?(?P<w2>\d{1,3}(?:\.\d+)?)\s*%)")
_RESPONSE_HEAD = re.compile(r"Response[ _]?([12])\b(?!\s*Final)", re.IGNORECASE)
_SKIP_WEIGHT = r"(?:\s*\(\s*(?:weight\s*[:=]?\s*)?\d{1,3}(?:\.\d+)?\s*%\s*\))?"
_SCORE_AFTER = r"\**\s*[:=\-\u2013]?\s*(?:score\s*[:=]?\s*)?(\d{1,2}(?:\.\d+)?)(?!\s*%)(?:\s*/\s*10)?"


def criteria_from_text(rationale: str) -> list[Criterion]:
    """Criteria, weights and both responses' scores from an official string rationale.

    Reads the layout the official contract asks for: criteria with percentage weights
    (`Clarity (40%)`, `- Clarity: 40%`), then a breakdown per response in which each
    criterion is named with its score (`Clarity: 8/10`). Returns [] when no criterion with
    a weight can be found; scores the breakdown does not give stay None.
    """
    first = _RESPONSE_HEAD.search(rationale)
    head = rationale[: first.start()] if first else rationale
    found: dict[str, float] = {}
    for m in _CRITERION_WEIGHT.finditer(head):
        name = re.sub(r"\s+", " ", m.group("name")).strip(" ,-&/")
        if name and name.lower() not in found and not re.search(r"weights?$|criteria$", name, re.IGNORECASE):
            found[name] = float(m.group("w1") or m.group("w2"))
    found = {k: v for k, v in found.items() if 0 < v <= 100}
    if not found:
        return []
    sections = _response_sections(rationale[len(head):])
    out = []
    for name, weight in found.items():
        pattern = re.compile(re.escape(name) + _SKIP_WEIGHT + _SCORE_AFTER, re.IGNORECASE)
        scores = []
        for idx in (1, 2):
            hit = pattern.search(sections.get(idx, ""))
            value = float(hit.group(1)) if hit else None
            scores.append(value if value is not None and 0 <= value <= 10 else None)
        out.append(Criterion(name=name[:200], weight=weight, raw_weight=weight, scores=(scores[0], scores[1])))
    return out


def _response_sections(text: str) -> dict[int, str]:
    """The breakdown text of Response 1 and of Response 2 (from each one's first heading)."""
    starts: dict[int, int] = {}
    for m in _RESPONSE_HEAD.finditer(text):
        starts.setdefault(int(m.group(1)), m.end())
    out = {}
    for idx, at in starts.items():
        other = [v for k, v in starts.items() if k != idx and v > at]
        out[idx] = text[at: min(other) if other else len(text)]
    return out


def parse_chain(text: str) -> EvaluationChain:
    """Parse one generated evaluation chain; raise `ChainParseError` (with `.raw`) if it breaks the contract."""
    if not isinstance(text, str):
        raise ChainParseError(f"expected generated text (str), got {type(text).__name__}",
                              f"<{type(text).__name__} object>")
    analysis, body = _json_block(text)
    obj = _load_object(body, text)
    verdict = _lookup(obj, "better_response")
    if verdict is None:
        verdict = _lookup(obj, "scores")  # the key the official specification's first line names
    if not isinstance(verdict, dict):
        raise ChainParseError('the JSON object has no "better_response" object', text)
    s1, s2 = _lookup(verdict, "response_1", "response1"), _lookup(verdict, "response_2", "response2")
    if s1 is None or s2 is None:
        raise ChainParseError('"better_response" lacks "response_1" or "response_2"', text)
    finals = (_as_number(s1, "final score of Response 1", text),
              _as_number(s2, "final score of Response 2", text))
    rationale = _lookup(obj, "rationale")
    criteria, weights_sum = _normalised(_criteria(rationale, text))
    return EvaluationChain(analysis=analysis, criteria=criteria, final_scores=finals, raw=text,
                           rationale=rationale if isinstance(rationale, str) else None, weights_sum=weights_sum)


_FINALS = re.compile(r'"better_response":\s*\{\s*"response_1":\s*(\d+(?:\.\d+)?)\s*,'
                     r'\s*"response_2":\s*(\d+(?:\.\d+)?)\s*\}')


def expected_final_scores(text: str, digit_probs: dict[int, Sequence[float]],
                          ten_probs: dict[int, float] | None = None) -> tuple[float, float] | None:
    """The two final scores with each digit replaced by its expected value under the model.

    `digit_probs` maps a character offset of `text` to the distribution over "0".."9" that
    the digit there was drawn from; `ten_probs` maps the first digit of a number to the
    model's probability that a "1" there goes on to "10". A final score is read as
    E[integer part] + E[d1]/10 + E[d2]/100: the integer part's expectation counts "1" as 10
    with the probability of "10" and as 1 otherwise; the fractional digits are the
    expectations along the chain's own (sampled) path. The chain itself is unchanged; this
    only lowers the variance of the number read from it.
    None when the block is not in the grammar's form or a digit has no distribution.
    """
    ten_probs = ten_probs or {}
    start = text.rfind(JSON_START)
    found = _FINALS.search(text, start if start >= 0 else 0)
    if start < 0 or found is None:
        return None
    values = []
    for group in (1, 2):
        number, at = found.group(group), found.start(group)
        whole, _, frac = number.partition(".")
        if len(whole) > 2 or (len(whole) == 2 and whole != "10"):
            values.append(float(number))  # not a score the grammar allows: nothing to read out
            continue
        probs = digit_probs.get(at)
        if probs is None or len(probs) != 10:
            return None
        total = sum(k * p for k, p in enumerate(probs)) + probs[1] * ten_probs.get(at, 0.0) * 9
        place = 0.1
        for offset, _ in enumerate(frac, start=len(whole) + 1):
            probs = digit_probs.get(at + offset)
            if probs is None or len(probs) != 10:
                return None
            total += place * sum(k * p for k, p in enumerate(probs))
            place /= 10
        values.append(total)
    return values[0], values[1]


def scores_for_candidates(chain: EvaluationChain, swapped: bool) -> tuple[float, float]:
    """Map a chain's (Response 1, Response 2) scores back to (a, b)."""
    s1, s2 = chain.final_scores
    return (s2, s1) if swapped else (s1, s2)


def persona_from_history(user: UserProfile, *, max_pairs: int = 8, max_chars: int = 300) -> str:
    """A persona stand-in built from the history text itself (the fast `history` persona source)."""
    parts = []
    if user.stated_preferences:
        parts.append(f"Stated preferences: {truncate(user.stated_preferences, max_chars * 2)}")
    for p in user.history[:max_pairs]:
        parts.append(f"User: {truncate(p.prompt, max_chars)}\nChosen: {truncate(p.chosen, max_chars)}\n"
                     f"Rejected: {truncate(p.rejected, max_chars)}")
    return "\n\n".join(parts) if parts else f"user {user.user_id} (no history)"
