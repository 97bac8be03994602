"""The Scorer's options: one pydantic model, the single source of their names, types, defaults,
checks and help.

`Scorer` keyword arguments, a bundle manifest's recommended `defaults`, the command line's
flags, the benchmarks' flags and the Ray adapter all go through `ScorerOptions`, and every
result records the options it was computed with (`CompareResult.options`). Options left as
None take the output contract's defaults (`resolve`). Model loading settings (device,
threads, context size, chat template) are not options: they do not change the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Annotated, Any, Literal, Mapping, Optional, get_args, get_origin

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError,
                      model_validator)

from . import protocol, scaling
from .errors import BundleError, ConfigError
from .prefix_cache import DEFAULT_DISK_MB, DEFAULT_MEMORY_MB
from .records import MAX_SEED


def check_seed(seed: object) -> int:
    """The seed if a result can record it (an integer in 0..2**64-1), else a ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer from 0 to 2**64-1 (what a result records), got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer from 0 to 2**64-1 (what a result records); {seed} is outside "
                          "0..2**64-1")
    return seed


MAX_CHAINS = 1024  # n_samples and n_neighbors each: every chain is a job held in memory


def _count(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    if value > MAX_CHAINS:
        raise ValueError(f"must be at most {MAX_CHAINS} (each chain is a job held in memory), got {value}")
    return value


def _path_text(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# Strict: a manifest's "600" or true is refused rather than read as 600 or 1.
Int = Annotated[int, Strict(), Field(gt=-(1 << 31), lt=1 << 31)]
Real = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]
Seed = Annotated[int, BeforeValidator(check_seed)]
Count = Annotated[int, BeforeValidator(_count)]


def _option(default: Any, help: str, *, manifest: bool = True, in_result: bool = True,
            metavar: str | None = None) -> Any:
    """A field with its help text. `manifest`: a bundle may recommend it; `in_result`: results record
    it (options that cannot change the numbers are left out)."""
    return Field(default, description=help,
                 json_schema_extra={"manifest": manifest, "in_result": in_result, "metavar": metavar})


class ScorerOptions(BaseModel):
    """How a Scorer samples, shows and combines evaluation chains (see `Scorer`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_samples: Count = _option(1, "individual-level chains (m) per pair, drawn with the user's own history",
                               manifest=False)
    n_neighbors: Count = _option(0, "prototype-level chains (n) per pair, drawn with the histories of the most "
                                    "similar prototype members (needs a bundle with prototypes)", manifest=False)
    seed: Seed = _option(0, "base seed of every draw, 0 to 2**64-1; a call may pass its own", manifest=False)
    max_tokens: Optional[Annotated[Int, Field(ge=1)]] = _option(
        None, "token budget per chain (default: the bundle's, else the output contract's)")
    temperature: Annotated[Real, Field(ge=0)] = _option(1.0, "sampling temperature (0: greedy)")
    top_p: Annotated[Real, Field(ge=0, le=1)] = _option(1.0, "nucleus sampling share, 0 to 1 (1: off)")
    min_p: Annotated[Real, Field(ge=0, le=1)] = _option(0.0, "min-p sampling floor, 0 to 1 (0: off)")
    constrained: Optional[Flag] = _option(
        None, "constrain the output to the contract's grammar (default: the contract's choice)")
    history_pairs: Annotated[Int, Field(ge=0)] = _option(
        protocol.DEFAULT_HISTORY_PAIRS, f"history pairs shown per prompt (default {protocol.DEFAULT_HISTORY_PAIRS})")
    c_self: Real = _option(0.5, "weight of the individual level (>= 0; c_self + c_nb > 0)")
    c_nb: Real = _option(0.5, "weight of the prototype level (>= 0; c_self + c_nb > 0)")
    analysis_chars: Optional[tuple[Int, Int]] = _option(
        None, "MIN,MAX characters of the free-text analysis in the grammar (default: the contract's)",
        metavar="MIN,MAX")
    rationale_chars: Optional[Int] = _option(None, "characters of the official contract's rationale in the grammar")
    max_criteria: Int = _option(protocol.DEFAULT_MAX_CRITERIA,
                                f"criteria in the JSON part at most (default {protocol.DEFAULT_MAX_CRITERIA})")
    expected_scores: Flag = _option(False, "read each chain's final scores as digit expectations "
                                           "(lower variance per chain) instead of the sampled numbers")
    history_order: Optional[Literal["original", "sampled"]] = _option(
        None, "history pairs shown in their original order or the sampled one (default: the contract's)")
    candidate_order: Optional[Literal["sample", "item"]] = _option(
        None, "draw the candidates' order per sample or once per pair, as the official pipeline "
              "(default: the contract's)")
    min_confidence: Optional[Annotated[Real, Field(gt=0, le=1)]] = _option(
        None, "abstain (no decision) when fewer than this share (0 < SHARE <= 1) of the parsed chains "
              "prefer the verdict's side", metavar="SHARE")
    persona_mode: Literal["cached", "query"] = _option(
        "cached", "LLM-persona indexes: neighbours found by the user's first parsed persona, reused (cached), "
                  "or by this call's first parsed chain (query, the official pipeline)")
    prefix_cache_mb: Annotated[Real, Field(ge=0)] = _option(
        DEFAULT_MEMORY_MB, f"memory for evaluated system messages reused across calls (default "
                           f"{DEFAULT_MEMORY_MB:g}; 0: off); results are the same either way",
        in_result=False, metavar="MB")
    prefix_cache_dir: Annotated[Optional[str], BeforeValidator(_path_text)] = _option(
        None, "also keep them on disk in DIR, for the next process (off by default)",
        manifest=False, in_result=False, metavar="DIR")
    prefix_cache_disk_mb: Annotated[Real, Field(ge=0)] = _option(
        DEFAULT_DISK_MB, f"size cap of prefix_cache_dir (default {DEFAULT_DISK_MB:g}); least recently used "
                         "files go first", manifest=False, in_result=False, metavar="MB")

    def __init__(self, /, **data: Any):
        # Python arguments get the typed error of the library, with the option named.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe(exc)) from None

    @model_validator(mode="after")
    def _together(self) -> "ScorerOptions":
        if self.n_samples + self.n_neighbors == 0:
            raise ValueError(f"n_samples={self.n_samples}, n_neighbors={self.n_neighbors}: both must be >= 0 and "
                             "at least one > 0; ask for at least one chain")
        scaling.combine([], [], c_self=self.c_self, c_nb=self.c_nb)  # the weights' one check
        return self

    # -- sources ---------------------------------------------------------------------------

    @classmethod
    def merge(cls, *sources: "ScorerOptions | Mapping[str, Any] | None") -> "ScorerOptions":
        """Later sources win; of a ScorerOptions only the fields it was given count."""
        merged: dict[str, Any] = {}
        for source in sources:
            if isinstance(source, ScorerOptions):
                merged.update(source.given())
            elif source is not None:
                if not isinstance(source, Mapping):
                    raise ConfigError(f"options must be a ScorerOptions or a dict of option names to values, "
                                      f"got {type(source).__name__}")
                merged.update(source)
        return cls(**merged)

    def given(self) -> dict[str, Any]:
        """The fields set explicitly (the others keep their defaults)."""
        return {name: getattr(self, name) for name in self.model_fields_set}

    @classmethod
    def manifest_defaults(cls, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """A bundle's recommended options that a bundle may set, validated; other names are ignored
        (a newer writer's options). The manifest is data: a value of the wrong type is a
        `BundleError` naming the option."""
        known = {k: v for k, v in defaults.items() if k in MANIFEST_OPTIONS}
        for name, value in known.items():
            problem = field_problem(name, value)
            if problem:
                raise BundleError(f"the manifest's recommended option {name!r} is invalid: {problem}. Fix the "
                                  "bundle's manifest 'defaults' or rebuild the bundle")
        return {name: _field_adapter(name).validate_python(value) for name, value in known.items()}

    # -- use -------------------------------------------------------------------------------

    def resolve(self, contract) -> "ScorerOptions":
        """These options with the output contract's defaults in place of None."""
        fill = {"max_tokens": contract.max_tokens, "constrained": contract.constrained,
                "analysis_chars": contract.analysis_chars, "history_order": contract.history_order,
                "candidate_order": contract.candidate_order}
        return self.model_copy(update={k: v for k, v in fill.items() if getattr(self, k) is None})

    def for_result(self, seed: int) -> dict[str, Any]:
        """What a result records: the options that can change its numbers, with the call's seed."""
        data = self.model_dump(mode="json", include=set(RESULT_OPTIONS))
        data["seed"] = seed
        return data


def _extra(name: str, key: str) -> Any:
    return (ScorerOptions.model_fields[name].json_schema_extra or {}).get(key)  # type: ignore[union-attr]


MANIFEST_OPTIONS = frozenset(n for n in ScorerOptions.model_fields if _extra(n, "manifest"))
RESULT_OPTIONS = frozenset(n for n in ScorerOptions.model_fields if _extra(n, "in_result"))
_ADAPTERS: dict[str, TypeAdapter] = {}


def _field_adapter(name: str) -> TypeAdapter:
    """Validates one field by itself (its type, bounds and validators; not the cross-field checks)."""
    if name not in _ADAPTERS:
        info = ScorerOptions.model_fields[name]
        annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        _ADAPTERS[name] = TypeAdapter(annotation)
    return _ADAPTERS[name]


def field_problem(name: str, value: Any) -> str | None:
    """Why `value` is not valid for option `name` (None: it is)."""
    try:
        _field_adapter(name).validate_python(value)
    except ValidationError as exc:
        return describe(exc, field=name)
    return None


def describe(exc: ValidationError, *, field: str | None = None) -> str:
    """A validation error as one line per problem: the option, what was wrong, what it means."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
        name = field or (loc[0] if loc else None)
        msg = err.get("msg", "")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            parts.append(msg if name is None or msg.startswith(name) else f"{name} {msg}")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown option {name!r}; the options are: {', '.join(ScorerOptions.model_fields)}")
        else:
            hint = ScorerOptions.model_fields[name].description if name in ScorerOptions.model_fields else None
            parts.append(f"{name}: {msg}, got {err.get('input')!r}" + (f" ({name}: {hint})" if hint else ""))
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# -- command-line flags ------------------------------------------------------------------------

def _bare(annotation: Any) -> Any:
    """The type inside Optional[...] and Annotated[...]."""
    while True:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is Annotated or (len(args) == 1 and get_origin(annotation) is not tuple
                                                   and get_origin(annotation) is not Literal):
            annotation = args[0]
        else:
            return annotation


def _flag_type(name: str, bare: Any):
    """An argparse type: the text read as the field's type and validated by the field, else a usage error."""
    def read(text: str):
        try:
            if get_origin(bare) is tuple:
                value: Any = tuple(int(x) for x in text.split(","))
            elif bare is int:
                value = int(text)
            elif bare is float:
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = text
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_type_word(bare)}") from None
        problem = field_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return read


def _type_word(bare: Any) -> str:
    if get_origin(bare) is tuple:
        return "a pair MIN,MAX of integers"
    return {int: "an integer", float: "a finite number"}.get(bare, "text")


def add_option_flags(parser: Any, *, names=None, exclude=()) -> None:
    """One flag per option (`--max-tokens` for max_tokens...), help from the field; a flag left out
    parses to None, so the bundle's recommended value or the default applies."""
    for name, info in ScorerOptions.model_fields.items():
        if (names is not None and name not in names) or name in exclude:
            continue
        bare = _bare(info.annotation)
        flag = "--" + name.replace("_", "-")
        if bare is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=info.description)
        elif get_origin(bare) is Literal:
            parser.add_argument(flag, choices=get_args(bare), default=None, help=info.description)
        else:
            parser.add_argument(flag, type=_flag_type(name, bare), default=None, metavar=_extra(name, "metavar"),
                                help=info.description)


def options_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (flags left out are not in the dict)."""
    return {name: getattr(args, name) for name in ScorerOptions.model_fields if getattr(args, name, None) is not None}


__all__ = ["ScorerOptions", "MANIFEST_OPTIONS", "RESULT_OPTIONS", "check_seed", "add_option_flags",
           "options_from_flags", "field_problem"]
