"""`python -m export bundle`: assemble a bundle directory from a GGUF model (and an exported embedder).

The bundle is built in a temporary directory beside the target and renamed into place,
so an interrupted build leaves no half-written bundle.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import orjson

from export._outdir import building_dir
from pgenrm_lite import protocol
from pgenrm_lite.bundle import file_entry, write_manifest
from pgenrm_lite.bundle import model_file_ok
from pgenrm_lite.errors import ExportError
from pgenrm_lite.records import MANIFEST_SCHEMA_VERSION, EmbedderInfo, LLMInfo, Manifest

LLM_FILE = "model.gguf"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
EMBEDDER_DIR = "embedder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", required=True, type=Path, help="the reward model as a GGUF file")
    parser.add_argument("--embedder", type=Path, help="an embedder exported by `python -m export onnx-embedder`")
    parser.add_argument("--template", type=Path,
                        help="a template JSON file (default: the built-in template); one written by "
                             "`python -m export template --from-official` selects the official contract")
    parser.add_argument("--chat-template", type=Path, metavar="FILE.jinja",
                        help="a chat template (Jinja) that replaces the one in the GGUF file")
    parser.add_argument("--out", required=True, type=Path, help="the bundle directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle directory")


def run(args: argparse.Namespace) -> int:
    out = build_bundle(args.gguf, args.out, embedder_dir=args.embedder, template=args.template,
                       chat_template=args.chat_template, force=args.force)
    print(f"bundle written to {out}")
    return 0


def gguf_facts(path: Path) -> LLMInfo:
    """Architecture, context length and chat-template presence, read from the GGUF header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if not isinstance(arch, str):
        raise ExportError(f"{path} has no general.architecture key; it is not a model GGUF")
    ctx = value(f"{arch}.context_length")
    file_type = value("general.file_type")
    return LLMInfo(file=LLM_FILE, architecture=arch, context_length=int(ctx or 0),
                   has_chat_template=value("tokenizer.chat_template") is not None,
                   file_type=None if file_type is None else str(file_type))


def build_bundle(gguf: Path, out: Path, *, embedder_dir: Path | None = None, template=None,
                 chat_template: Path | None = None, force: bool = False) -> Path:
    """A bundle around `gguf`; its manifest records the template, its output contract and the
    contract's defaults (e.g. max_tokens 3,072 for the official contract)."""
    gguf, out = Path(gguf), Path(out)
    if not model_file_ok(gguf):
        raise ExportError(f"{gguf} is not a GGUF v2/v3 file; convert the checkpoint with `python -m export gguf`")
    tmpl = protocol.resolve_template(template)
    chat_text = _read_chat_template(chat_template) if chat_template is not None else None
    contract = tmpl.output_contract
    with building_dir(out, force) as tmp:
        shutil.copyfile(gguf, tmp / LLM_FILE)
        llm = gguf_facts(tmp / LLM_FILE)
        rels = [LLM_FILE]
        if chat_text is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_text, encoding="utf-8")
            llm = llm.model_copy(update={"chat_template_file": CHAT_TEMPLATE_FILE})
            rels.append(CHAT_TEMPLATE_FILE)
        embedder = None
        if embedder_dir is not None:
            embedder, emb_rels = _copy_embedder(Path(embedder_dir), tmp)
            rels += emb_rels
        manifest = Manifest(schema_version=MANIFEST_SCHEMA_VERSION, files=[file_entry(tmp, tmp / r) for r in rels],
                            llm=llm, template=tmpl.to_dict(), embedder=embedder,
                            defaults={"max_tokens": contract.max_tokens, "constrained": contract.constrained})
        write_manifest(tmp, manifest)
    return out


def _read_chat_template(path: Path) -> str:
    from pgenrm_lite.chat import ChatFormatter

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--chat-template {path}: cannot read it as UTF-8 text ({exc})") from exc
    ChatFormatter(text)  # compiles, or a ConfigError says why
    return text


def _copy_embedder(src: Path, bundle: Path) -> tuple[EmbedderInfo, list[str]]:
    desc_path = src / "embedder.json"
    if not desc_path.is_file():
        raise ExportError(f"{src} has no embedder.json; export the embedder with `python -m export onnx-embedder`")
    desc = orjson.loads(desc_path.read_bytes())
    dest = bundle / EMBEDDER_DIR
    dest.mkdir()
    names = ["embedder.json", desc["model_file"], desc["tokenizer_file"]]
    for name in names:
        if not (src / name).is_file():
            raise ExportError(f"embedder file {src / name} is missing")
        shutil.copyfile(src / name, dest / name)
    info = EmbedderInfo(dir=EMBEDDER_DIR, model_file=desc["model_file"], tokenizer_file=desc["tokenizer_file"],
                        dimension=desc["dimension"], pooling=desc["pooling"], normalized=desc["normalized"],
                        max_length=desc["max_length"], query_prefix=desc.get("query_prefix"))
    return info, [f"{EMBEDDER_DIR}/{n}" for n in names]
