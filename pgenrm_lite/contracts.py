"""The output contracts a P-GenRM model can be held to, as data, and their grammars.

- `structured`: the project's own contract for general instruct models (the default
  SmolLM2 bundle). PART 2's `rationale` is an object with a typed list of criteria; the
  grammar (on by default) bounds every free-text field, so a small model finishes inside
  its token budget and writes readable criterion names.
- `official`: what the released P-GenRM checkpoints were trained to write. `rationale`
  is one string (criteria and weights, a scoring breakdown, the final-score computation)
  and `better_response` holds the two final scores. The grammar is off by default (the
  model writes this shape by itself); when on, it constrains only the JSON block's shape
  and the final scores, never the free text.

A template file names its contract (`"contract": "official"`); the contract supplies the
defaults that differ between the two (token budget, grammar, how data rows are read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .errors import ConfigError

JSON_START = "<JSON_START>"
JSON_END = "<JSON_END>"

ContractName = Literal["structured", "official"]
Turns = Literal["all", "first"]
HistoryOrder = Literal["original", "sampled"]
CandidateOrder = Literal["sample", "item"]


@dataclass(frozen=True)
class Contract:
    name: ContractName
    max_tokens: int                 # default budget of new tokens per chain
    constrained: bool               # grammar on by default
    analysis_chars: Optional[tuple[int, int]]  # PART 1 bounds under the grammar (None: unbounded)
    turns: Turns                    # multi-turn rows: every turn labelled, or the first turn only
    history_order: HistoryOrder     # shown history pairs: in the user's order, or as drawn
    candidate_order: CandidateOrder  # candidate order drawn per sample, or once per item


CONTRACTS: dict[str, Contract] = {
    "structured": Contract("structured", max_tokens=1280, constrained=True, analysis_chars=(40, 2000),
                           turns="all", history_order="original", candidate_order="sample"),
    # The official single-inference run allows 3,072 new tokens and reads only the first user
    # turn; its history pairs keep the order they were drawn in. Candidate order per sample
    # stays the default (it de-biases position); "item" is the official behaviour.
    "official": Contract("official", max_tokens=3072, constrained=False, analysis_chars=None,
                         turns="first", history_order="sampled", candidate_order="sample"),
}


def get_contract(name: str) -> Contract:
    try:
        return CONTRACTS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown output contract {name!r}; known: {sorted(CONTRACTS)}") from None


# -- structured -------------------------------------------------------------------------

DEFAULT_MAX_CRITERIA = 5
# A criterion name is a short phrase of words: letters, digits, spaces and ordinary
# punctuation. The grammar below and this pattern say the same thing.
NAME_PATTERN = r"[A-Za-z][A-Za-z0-9'\-]{0,13}(?:(?: |, | & | / )[A-Za-z0-9][A-Za-z0-9'\-]{0,13}){0,3}"


def structured_token_need(analysis_chars: tuple[int, int], max_criteria: int) -> int:
    """A generous token count for the longest output the structured grammar allows on typical text.

    About three characters per token for free text and ~56 tokens per criterion (markup,
    a name of up to four words, three numbers); a `max_tokens` below this risks chains
    cut off inside the JSON block.
    """
    return analysis_chars[1] // 3 + max_criteria * 56 + 48


def structured_grammar(analysis_chars: tuple[int, int], max_criteria: int) -> str:
    """GBNF: bounded free text, then the JSON block with readable names and bounded numbers.

    Free text may not contain '<', so the first '<' must open `<JSON_START>`. Criterion
    scores are 1-10 (one optional decimal), weights 1-100, final scores 0-10.
    """
    lo, hi = _check_bounds(analysis_chars)
    if max_criteria < 1:
        raise ConfigError("max_criteria must be >= 1")
    more = f"(\",\" ws criterion){{0,{max_criteria - 1}}}" if max_criteria > 1 else ""
    return "\n".join([
        f'root ::= analysis "\\n{JSON_START}\\n" object "\\n{JSON_END}"',
        f"analysis ::= [^<\\x00-\\x08]{{{lo},{hi}}}",
        'object ::= "{" ws "\\"rationale\\": {" ws "\\"criteria\\": [" ws criterion ' + more
        + ' ws "]" ws "}," ws "\\"better_response\\": {" ws "\\"response_1\\": " final ","'
        + ' ws "\\"response_2\\": " final ws "}" ws "}"',
        'criterion ::= "{\\"name\\": \\"" name "\\", \\"weight\\": " weight ", \\"response_1\\": " score'
        + ' ", \\"response_2\\": " score "}"',
        "name ::= [A-Za-z] wordrest (sep [A-Za-z0-9] wordrest){0,3}",
        "wordrest ::= [A-Za-z0-9'\\-]{0,13}",
        'sep ::= " " | ", " | " & " | " / "',
        'weight ::= "100" | [1-9] [0-9]?',
        'score ::= "10" | [1-9] ("." [0-9])?',
        'final ::= "10" ("." "0"{1,2})? | [0-9] ("." [0-9]{1,2})?',
        'ws ::= [ \\n]{0,2}',
    ]) + "\n"


# -- official ---------------------------------------------------------------------------

def official_grammar(analysis_chars: Optional[tuple[int, int]] = None,
                     rationale_chars: Optional[int] = None) -> str:
    """GBNF for the official shape: any free text, then `<JSON_START>` {rationale string,
    better_response scores} `<JSON_END>`.

    Unbounded free text is any text that does not itself contain `<JSON_START>` (a
    character automaton, one rule per matched prefix of the marker), so the model may
    write '<', code or markdown freely; it just cannot end before a valid block. Bounds
    (for tests and tiny models) make PART 1 `analysis_chars` characters without '<' and
    the rationale at most `rationale_chars` characters.
    """
    lines = []
    if analysis_chars is None:
        lines.append("root ::= t0")
        marker = JSON_START
        for k in range(len(marker)):  # t{k}: the text so far ends with the first k marker characters
            if k == 0:
                alts = ["[^<] t0", '"<" t1', "block"]
            else:
                alts = [f'"{marker[k]}" t{k + 1}'] if k < len(marker) - 1 else []
                alts += ['"<" t1', f"[^<{marker[k]}] t0", "block"]
            lines.append(f"t{k} ::= " + " | ".join(alts))
    else:
        lo, hi = _check_bounds(analysis_chars)
        lines.append(f"root ::= [^<\\x00-\\x08]{{{lo},{hi}}} ws block")
    if rationale_chars is not None and rationale_chars < 1:
        raise ConfigError("rationale_chars must be >= 1")
    rep = "*" if rationale_chars is None else f"{{0,{rationale_chars}}}"
    lines += [
        f'block ::= "{JSON_START}" ws "{{" ws "\\"rationale\\"" ws ":" ws string ws "," ws '
        '"\\"better_response\\"" ws ":" ws "{" ws "\\"response_1\\"" ws ":" ws final ws "," ws '
        f'"\\"response_2\\"" ws ":" ws final ws "}}" ws "}}" ws "{JSON_END}"',
        f'string ::= "\\"" char{rep} "\\""',
        'char ::= [^"\\\\\\x00-\\x1f] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
        'final ::= number | "\\"" number "\\""',
        'number ::= "10" ("." "0"{1,3})? | [0-9] ("." [0-9]{1,3})?',
        "ws ::= [ \\t\\n]{0,8}",
    ]
    return "\n".join(lines) + "\n"


def grammar_for(contract: Contract, *, analysis_chars: Optional[tuple[int, int]], max_criteria: int,
                rationale_chars: Optional[int] = None) -> str:
    if contract.name == "structured":
        if analysis_chars is None:
            raise ConfigError("the structured contract's grammar needs analysis_chars=(min, max)")
        return structured_grammar(analysis_chars, max_criteria)
    return official_grammar(analysis_chars, rationale_chars)


def token_need(contract: Contract, *, analysis_chars: Optional[tuple[int, int]], max_criteria: int) -> int:
    """The smallest max_tokens the contract's grammar can finish in on typical text (0: no such bound)."""
    if contract.name == "structured" and analysis_chars is not None:
        return structured_token_need(analysis_chars, max_criteria)
    return 0


def _check_bounds(analysis_chars) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in analysis_chars)
    except (TypeError, ValueError):
        raise ConfigError("analysis_chars must be (min, max) with 0 < min <= max") from None
    if not 0 < lo <= hi:
        raise ConfigError("analysis_chars must be (min, max) with 0 < min <= max")
    return lo, hi
