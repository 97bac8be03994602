"""`python -m export template --from-official PATH`: a template file from a user's own
checkout of the official P-GenRM code (`Character-GenRM/`), so a bundle can prompt a
released checkpoint exactly as it was trained.

That repository has no licence, so its prompt text is never shipped with this project:
this command reads the user's checkout and writes the template file on the user's disk.
It parses `inference/PROMPTS.py` with `ast` (nothing in it runs) and takes two string
constants: the system prompt (with `{few_shots}`, the history block) and the user prompt
(with `{user_input}`, `{response_1}`, `{response_2}`). Their `str.format` fields become
the template's `{{history}}`, `{{query}}`, `{{response_1}}`, `{{response_2}}`; the
history entry is the official `User: ...\\nChosen: ...\\nRejected: ...\\n\\n` layout, and
the contract is `official`.
"""

from __future__ import annotations

import argparse
import ast
import string
from pathlib import Path

import orjson

from pgenrm_lite._atomic import atomic_write_bytes
from pgenrm_lite.errors import ExportError
from pgenrm_lite.protocol import Template

SYSTEM_NAME = "USER_PREFERENCE_ANALYSIS_PROMPT"
USER_NAME = "USER_PROMPT_TEMPLATE"
# official str.format field -> this project's placeholder
FIELDS = {"few_shots": "history", "user_input": "query", "response_1": "response_1", "response_2": "response_2"}
HISTORY_ENTRY = "User: {{prompt}}\nChosen: {{chosen}}\nRejected: {{rejected}}\n\n"
# The official prompt has no slot for stated preferences; with this template they are not shown.
STATED = "{{stated_preferences}}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-official", required=True, type=Path, metavar="PATH",
                        help="your checkout of the official code: the repository, its Character-GenRM/ "
                             "folder, its inference/ folder or PROMPTS.py itself")
    parser.add_argument("--out", required=True, type=Path, help="the template JSON file to write")
    parser.add_argument("--name", default="p-genrm-official", help="the template's name (recorded in results)")


def run(args: argparse.Namespace) -> int:
    template = read_official(args.from_official, name=args.name)
    write_template(template, args.out)
    print(f"template {template.name!r} (contract {template.contract}) written to {args.out}; "
          f"use it with `python -m export bundle --template {args.out} ...`")
    return 0


def find_prompts_file(path: Path) -> Path:
    path = Path(path)
    for candidate in (path, path / "PROMPTS.py", path / "inference" / "PROMPTS.py",
                      path / "Character-GenRM" / "inference" / "PROMPTS.py"):
        if candidate.is_file():
            return candidate
    raise ExportError(f"{path}: no PROMPTS.py found (looked in it, inference/ and Character-GenRM/inference/); "
                      "point --from-official at your checkout of the official Character-GenRM code")


def _string_constants(source: str, where: Path) -> dict[str, str]:
    try:
        tree = ast.parse(source, filename=str(where))
    except SyntaxError as exc:
        raise ExportError(f"{where} is not valid Python ({exc.msg}, line {exc.lineno})") from exc
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def _convert(text: str, name: str, where: Path, required: set[str]) -> str:
    """A `str.format` template to this project's `{{placeholder}}` form ('{{' and '}}' unescaped)."""
    out, seen = [], set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ExportError(f"{where}: {name} is not a str.format template ({exc})") from exc
    for literal, field, spec, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if field not in FIELDS or spec or conversion:
            raise ExportError(f"{where}: {name} has the format field {{{field}}}; expected only "
                              f"{sorted('{' + f + '}' for f in required)}")
        seen.add(field)
        out.append("{{" + FIELDS[field] + "}}")
    missing = required - seen
    if missing:
        raise ExportError(f"{where}: {name} lacks the format field(s) {sorted('{' + m + '}' for m in missing)}")
    return "".join(out)


def read_official(path: Path, *, name: str = "p-genrm-official") -> Template:
    prompts = find_prompts_file(path)
    try:
        source = prompts.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read {prompts} as UTF-8 text ({exc})") from exc
    constants = _string_constants(source, prompts)
    for const in (SYSTEM_NAME, USER_NAME):
        if const not in constants:
            raise ExportError(f"{prompts} defines no string constant {const}; is this the official PROMPTS.py?")
    system = _convert(constants[SYSTEM_NAME], SYSTEM_NAME, prompts, {"few_shots"})
    user = _convert(constants[USER_NAME], USER_NAME, prompts, {"user_input", "response_1", "response_2"})
    return Template(system=system, user=user, history_entry=HISTORY_ENTRY, stated_preferences=STATED,
                    name=name, contract="official")


def write_template(template: Template, out: Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out), orjson.dumps(template.to_dict(), option=orjson.OPT_INDENT_2))
