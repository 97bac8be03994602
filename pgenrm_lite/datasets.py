"""PersonalRewardBench-format data: rows, users built from their train rows, the pairs to judge.

Also maps the two-user HH-RLHF relabelling (`objective` = user) into the same shape.
Every malformed line is a `DataFormatError` naming the file, line and field.
"""

from __future__ import annotations

import gzip
import os
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, TypedDict

import orjson

from ._io import open_nonblocking_writer
from .errors import DataFormatError, RecordError
from .protocol import derive_seed
from .records import MAX_TEXT_CHARS, MAX_USER_ID_CHARS, Preference, UserProfile

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Row:
    """One preference row: a user's query (rendered context), chosen and rejected replies."""

    user_id: str
    prompt: str
    chosen: str
    rejected: str
    split: str
    conversation_id: str | None = None

    def as_preference(self) -> Preference:
        return Preference(prompt=self.prompt, chosen=self.chosen, rejected=self.rejected)


MAX_LINE_BYTES = 16 << 20  # one JSON Lines row: far above what MAX_TEXT_CHARS fields need
MAX_JSON_FILE_BYTES = 256 << 20  # a .json file (one list or object) is read whole


class Where(TypedDict):
    """Where a record came from, for DataFormatError."""

    path: str | None
    line: int | None


def _open_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-empty lines, each at most MAX_LINE_BYTES; a FIFO with no writer reads as empty."""
    try:
        raw = open_nonblocking_writer(path)
    except FileNotFoundError as exc:
        raise DataFormatError("file does not exist", path=str(path)) from exc
    except OSError as exc:
        raise DataFormatError(f"cannot be opened ({exc.strerror})", path=str(path)) from exc
    try:
        with raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw) as fh:
            lineno = 0
            while True:
                line = fh.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > MAX_LINE_BYTES:
                    raise DataFormatError(f"line is longer than {MAX_LINE_BYTES:,} bytes (is this a JSON Lines "
                                          "file?)", path=str(path), line=lineno)
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, zlib.error) as exc:  # e.g. a truncated, corrupted or non-gzip .gz file
        raise DataFormatError(f"cannot be read ({exc})", path=str(path)) from exc


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) pairs from JSON Lines, or from a JSON file holding a list/object."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".json"):
        lines, size = [], 0
        for item in _open_lines(path):
            size += len(item[1])
            if size > MAX_JSON_FILE_BYTES:
                raise DataFormatError(f"larger than {MAX_JSON_FILE_BYTES:,} bytes; use JSON Lines (.jsonl) for "
                                      "large files", path=str(path))
            lines.append(item)
        try:
            data = orjson.loads(b"".join(line for _, line in lines))
        except orjson.JSONDecodeError as exc:
            raise DataFormatError(f"not valid JSON ({exc})", path=str(path)) from exc
        items = data if isinstance(data, list) else [data]
        yield from enumerate(items, 1)
        return
    for lineno, line in _open_lines(path):
        try:
            yield lineno, orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataFormatError(f"not valid JSON ({exc})", path=str(path), line=lineno) from exc


def _text(obj: dict, key: str, where: Where, *, label: str | None = None) -> str:
    value = obj.get(key)
    label = label or key
    if not isinstance(value, str):
        raise DataFormatError(f"field '{label}' must be a string, got {type(value).__name__}", field=label, **where)
    if len(value) > MAX_TEXT_CHARS:
        raise DataFormatError(f"field '{label}' is longer than {MAX_TEXT_CHARS} characters", field=label, **where)
    return value


def _message_content(row: dict, key: str, where: Where) -> str:
    msg = row.get(key)
    if isinstance(msg, str):
        return _text(row, key, where)
    if not isinstance(msg, dict):
        raise DataFormatError(f"field '{key}' must be a {{role, content}} object", field=key, **where)
    return _text(msg, "content", where, label=f"{key}.content")


def render_context(context: list, where: Where, turns: str = "all") -> str:
    """A conversation as query text: a single user turn as is, several turns labelled.

    turns="first" keeps only the first turn, as the official P-GenRM pipeline does
    (`context[0]['content']`, for the query and in history entries alike).
    """
    if turns not in ("all", "first"):
        raise DataFormatError(f"turns must be 'all' or 'first', got {turns!r}", **where)
    if not isinstance(context, list) or not context:
        raise DataFormatError("field 'context' must be a non-empty list of {role, content}",
                              field="context", **where)
    all_turns = []
    for i, turn in enumerate(context):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) \
                or not isinstance(turn.get("role", "user"), str):
            raise DataFormatError(f"field 'context[{i}]' must be a {{role, content}} object with "
                                  "string role and content", field=f"context[{i}]", **where)
        all_turns.append((turn.get("role", "user"), turn["content"]))
    text = all_turns[0][1] if len(all_turns) == 1 or turns == "first" else "\n\n".join(
        f"{'User' if r == 'user' else 'Assistant'}: {c}" for r, c in all_turns)
    if len(text) > MAX_TEXT_CHARS:
        raise DataFormatError(f"field 'context' is longer than {MAX_TEXT_CHARS} characters", field="context",
                              **where)
    return text


def parse_row(obj: Any, *, path: str | None = None, line: int | None = None, turns: str = "all") -> Row:
    where: Where = {"path": path, "line": line}
    if not isinstance(obj, dict):
        raise DataFormatError(f"a row must be a JSON object, got {type(obj).__name__}", **where)
    for key in ("user_id", "context", "chosen", "rejected"):
        if key not in obj:
            raise DataFormatError(f"missing field '{key}'", field=key, **where)
    user_id = obj["user_id"]
    if isinstance(user_id, int) and not isinstance(user_id, bool) and abs(user_id) < 10 ** 256:
        user_id = str(user_id)
    if not isinstance(user_id, str) or not 0 < len(user_id) <= MAX_USER_ID_CHARS:
        raise DataFormatError(f"field 'user_id' must be a non-empty string of at most {MAX_USER_ID_CHARS} "
                              "characters", field="user_id", **where)
    split = obj.get("split", "train")
    if not isinstance(split, str) or split not in SPLITS:
        shown = repr(split[:40]) if isinstance(split, str) else f"a {type(split).__name__}"
        raise DataFormatError(f"field 'split' is {shown}; expected one of {SPLITS}", field="split", **where)
    conv = obj.get("conversation_id")
    if conv is not None and (isinstance(conv, bool) or not isinstance(conv, (str, int))
                             or isinstance(conv, int) and abs(conv) >= 10 ** 256):
        raise DataFormatError("field 'conversation_id' must be a string or an integer", field="conversation_id",
                              **where)
    return Row(user_id=user_id, prompt=render_context(obj["context"], where, turns),
               chosen=_message_content(obj, "chosen", where), rejected=_message_content(obj, "rejected", where),
               split=split, conversation_id=None if conv is None else str(conv))


def load_rows(path: str | Path, *, turns: str = "all") -> list[Row]:
    """Rows of a PersonalRewardBench-format file (.jsonl, .jsonl.gz, or .json list/object).

    Multi-turn contexts become the query as every turn labelled (turns="all") or the first
    turn only (turns="first", the official contract's default).
    """
    path = Path(path)
    return [parse_row(obj, path=str(path), line=n, turns=turns) for n, obj in _records(path)]


def load_hh(path: str | Path, *, test_fraction: float = 0.5, seed: int = 0,
            users_per_objective: int = 1, limit_per_user: int | None = None) -> list[Row]:
    """The two-user HH-RLHF relabelling as rows: user = objective, response = transcript suffix.

    Each objective's rows are shuffled (seeded) and split into train (history) and test;
    `users_per_objective > 1` deals them round-robin into pseudo-users `helpful-0`, ...
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataFormatError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path = Path(path)
    by_user: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for lineno, obj in _records(path):
        where: Where = {"path": str(path), "line": lineno}
        if not isinstance(obj, dict):
            raise DataFormatError("a row must be a JSON object", **where)
        prompt = _text(obj, "prompt", where)
        chosen, rejected = _text(obj, "chosen", where), _text(obj, "rejected", where)
        objective = _text(obj, "objective", where)
        for key, full in (("chosen", chosen), ("rejected", rejected)):
            if not full.startswith(prompt):
                raise DataFormatError(f"field '{key}' does not start with 'prompt'", field=key, **where)
        by_user[objective].append((prompt, chosen[len(prompt):].strip(), rejected[len(prompt):].strip()))
    rows: list[Row] = []
    for objective in sorted(by_user):
        items = by_user[objective]
        random.Random(derive_seed(seed, "hh", objective)).shuffle(items)
        for k in range(users_per_objective):
            uid = objective if users_per_objective == 1 else f"{objective}-{k}"
            mine = items[k::users_per_objective]
            if limit_per_user is not None:
                mine = mine[:limit_per_user]
            n_test = max(1, round(len(mine) * test_fraction))
            for i, (p, c, r) in enumerate(mine):
                rows.append(Row(user_id=uid, prompt=p, chosen=c, rejected=r,
                                split="test" if i < n_test else "train"))
    return rows


def users_from_rows(rows: Iterable[Row], *, splits: tuple[str, ...] = ("train",)) -> dict[str, UserProfile]:
    """Each user's profile, with their rows of the given splits as history."""
    hist: dict[str, list[Preference]] = defaultdict(list)
    seen: list[str] = []
    for row in rows:
        if row.user_id not in hist:
            seen.append(row.user_id)
            hist[row.user_id]  # keep users with no history too
        if row.split in splits:
            hist[row.user_id].append(row.as_preference())
    try:
        return {uid: UserProfile(user_id=uid, history=hist[uid]) for uid in seen}
    except Exception as exc:  # pydantic validation (e.g. a history over the size limit)
        raise RecordError(f"cannot build user profiles: {exc}") from exc


def rows_of_split(rows: Iterable[Row], split: Literal["test", "val"] = "test") -> list[Row]:
    return [r for r in rows if r.split == split]


# -- user profiles and RewardBench-style pairs (integrations) --------------------------------

NO_USER = "(no user)"  # the user id of RewardBench rows that name no user


def load_profiles(path: str | os.PathLike) -> dict[str, UserProfile]:
    """`UserProfile` records from a JSON list (or one object) or a JSON Lines file, keyed by user id."""
    path = Path(path)
    out: dict[str, UserProfile] = {}
    for lineno, obj in _records(path):
        where: Where = {"path": str(path), "line": lineno}
        try:
            profile = UserProfile.validate_obj(obj)
        except RecordError as exc:
            raise DataFormatError(f"not a UserProfile record: {exc}", **where) from exc
        if profile.user_id in out:
            raise DataFormatError(f"user_id {profile.user_id!r} appears twice", field="user_id", **where)
        out[profile.user_id] = profile
    return out


def _last_turn_text(value: Any, key: str, where: Where) -> str:
    """A RewardBench response: a string, a {role, content} object, or a message list (its last turn)."""
    if isinstance(value, list) and value:
        value = value[-1]
    return _message_content({key: value}, key, where)


def load_rewardbench(path: str | Path, *, user_column: str | None = None) -> list[Row]:
    """Pairs of a RewardBench-style file (`prompt`, `chosen`, `rejected`; .jsonl, .jsonl.gz or .json).

    `prompt` is a string or a list of {role, content} turns; `chosen`/`rejected` a string, a
    {role, content} object or a message list (its last turn). With `user_column`, a row's user
    is that column (rows where it is missing or empty get `NO_USER`). Every row is a test pair;
    `id` (if present) is kept as the conversation id.
    """
    path = Path(path)
    rows: list[Row] = []
    for lineno, obj in _records(path):
        where: Where = {"path": str(path), "line": lineno}
        if not isinstance(obj, dict):
            raise DataFormatError(f"a row must be a JSON object, got {type(obj).__name__}", **where)
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise DataFormatError(f"missing field '{key}'", field=key, **where)
        prompt = obj["prompt"]
        prompt = _text(obj, "prompt", where) if not isinstance(prompt, list) else render_context(prompt, where)
        user = obj.get(user_column) if user_column else None
        if isinstance(user, bool) or (user is not None and not isinstance(user, (str, int))):
            raise DataFormatError(f"field '{user_column}' must be a string user id", field=user_column, **where)
        user_id = str(user) if user is not None and str(user) != "" else NO_USER
        if len(user_id) > 256:
            raise DataFormatError(f"field '{user_column}' is longer than 256 characters", field=user_column, **where)
        conv = obj.get("id")
        rows.append(Row(user_id=user_id, prompt=prompt, chosen=_last_turn_text(obj["chosen"], "chosen", where),
                        rejected=_last_turn_text(obj["rejected"], "rejected", where), split="test",
                        conversation_id=None if conv is None else str(conv)))
    return rows
