"""`python -m export <command>`: each sub-command lives in its own module.

A module listed in COMMANDS provides `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `--help` stays fast and a
missing optional dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "gguf": ("export.gguf_convert", "convert a Hugging Face causal LM checkpoint to GGUF"),
    "onnx-embedder": ("export.onnx_embedder", "export a sentence-transformers embedder to ONNX"),
    "template": ("export.official_template", "write a template file from your checkout of the official code"),
    "bundle": ("export.bundle_build", "assemble a bundle directory from exported files"),
    "prototypes": ("export.prototypes_build", "build the user-prototype index into a bundle"),
    "default-bundle": ("export.default_bundle", "build the embedded default bundle"),
    "quantize": ("export.quantize", "re-quantise a GGUF file with llama.cpp's quantiser"),
    "check-quant": ("export.check_quant", "check a quantised judge's verdicts against a reference GGUF"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"python -m export {name}",
                                         description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    from pgenrm_lite.errors import PgenrmError

    try:
        return int(module.run(args) or 0)
    except PgenrmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
