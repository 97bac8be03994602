"""`python -m export onnx-embedder`: a sentence-transformers model to a self-contained ONNX embedder.

The graph takes token ids (plus attention mask, plus token type ids when the model has
them) with dynamic batch and sequence axes and returns `sentence_embedding` [batch, dim]:
pooling and L2 normalisation run inside the graph, so the runtime only tokenises and pads.

Pooling: mean, CLS, or last token (decoder embedders such as Qwen3-Embedding). For
last-token pooling the graph takes the last position the attention mask keeps and derives
position ids from the mask, so a row padded on the left embeds exactly as one padded on
the right. Such models may ask for an instruction before queries (sentence-transformers'
`prompts["query"]`); it is recorded as `query_prefix` and the runtime prepends it to query
texts only (`Embedder.embed(texts, query=True)`).

Output directory:
    model.onnx      the graph; with --int8 it *is* the quantised graph (no fp32 copy is
                    kept, so a bundle ships one model file; `quantized` in embedder.json
                    says which it is)
    tokenizer.json  copied unchanged from the source (the runtime sets truncation and
                    padding itself from embedder.json, ignoring what the file says)
    embedder.json   the description the runtime reads (see `_description`)

The directory is built under a temporary name beside the target and renamed on success.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch

from export._outdir import building_dir
from pgenrm_lite._progress import Progress
from pgenrm_lite.errors import CheckpointError, ExportError, TokenizerExportError

# Never reach for a model hub: everything is read from the local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORMAT = "pgenrm-lite-embedder"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
DESCRIPTION_FILE = "embedder.json"
OUTPUT_NAME = "sentence_embedding"
POOLING_MODES = ("mean", "cls", "last")
OPSET = 20
# fp32 graph against torch on the built-in check batch; far above float noise (~1e-7).
CHECK_TOLERANCE = 1e-4
INT8_SCHEME = ("onnxruntime dynamic quantisation: int8 per-channel weights, uint8 per-tensor "
               "activations at run time; feed-forward down-projections (after GELU) kept fp32")

# modules.json entries the exporter understands; anything else (Dense, ...) is refused.
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"
# 1_Pooling/config.json key suffix -> our pooling name
_POOLING_KEYS = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "last"}
_CHECK_TEXTS = ("A short sentence.",
                "A much longer sentence that the check repeats until it reaches the maximum length. " * 40)


@dataclass(frozen=True)
class SourceModel:
    """What the sentence-transformers folder says about itself."""

    root: Path
    transformer_dir: Path
    pooling: str
    has_normalize: bool
    max_seq_length: int | None
    pooling_dimension: int | None
    tokenizer_file: Path | None
    query_prefix: str | None = None


# -- command line ------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", type=Path, required=True,
                        help="a sentence-transformers model folder (modules.json, 1_Pooling/, config.json, weights)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--int8", action="store_true",
                        help="write model.onnx as a dynamically int8-quantised graph")
    parser.add_argument("--max-length", type=int, default=None,
                        help="token limit (default: sentence_bert_config.json max_seq_length)")
    parser.add_argument("--source", default=None, help="model name to record (default: guessed from the folder)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="pooling (default: the one 1_Pooling/config.json names)")
    parser.add_argument("--query-prefix", default=None,
                        help="instruction prepended to query texts at run time (default: the model's "
                        "prompts['query'] in config_sentence_transformers.json, if any; '' for none)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    summary = export_embedder(args.hf, args.out, int8=args.int8, max_length=args.max_length,
                              source=args.source, force=args.force, pooling=args.pooling,
                              query_prefix=args.query_prefix)
    desc = summary["description"]
    check = summary["check"]
    print(f"wrote {summary['out_dir']} in {summary['seconds']:.1f}s")
    print(f"  model      {desc['model_file']} ({summary['model_bytes'] / 1e6:.1f} MB, "
          f"{desc['quantized'] or 'fp32'}), opset {desc['opset']}")
    print(f"  embedding  dim {desc['dimension']}, {desc['pooling']} pooling, "
          f"normalised ({desc['normalize_from']}), max_length {desc['max_length']}")
    if desc.get("query_prefix"):
        print(f"  queries    prefixed with {desc['query_prefix']!r}")
    print(f"  inputs     {', '.join(desc['input_names'])} -> {desc['output_name']}")
    print(f"  check      fp32 vs torch max |diff| {check['fp32_max_abs_diff']:.2e}"
          + (f"; int8 vs fp32 min cosine {check['int8_min_cosine']:.4f}" if "int8_min_cosine" in check else ""))
    return 0


# -- the export --------------------------------------------------------------------------

def export_embedder(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, int8: bool = False,
                    max_length: int | None = None, source: str | None = None, force: bool = False,
                    pooling: str | None = None, query_prefix: str | None = None) -> dict:
    """Export `hf_dir` into `out_dir`; return a summary with the written description.

    `pooling` overrides the folder's Pooling module; `query_prefix` its query prompt ("" for
    none). Raises ExportError (or its subclasses) for anything wrong with the input; nothing
    is left at `out_dir` unless the whole export succeeded.
    """
    start = time.monotonic()
    src = read_source(Path(hf_dir))
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise ExportError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
        src = dataclasses.replace(src, pooling=pooling)
    if query_prefix is not None:
        src = dataclasses.replace(src, query_prefix=query_prefix or None)
    out = Path(out_dir)
    with building_dir(out, force) as tmp, Progress(5 if int8 else 4, "onnx-embedder", unit="step") as bar:
        desc, check = _export_into(tmp, src, int8=int8, max_length=max_length, source=source, bar=bar)
    return {"out_dir": str(out), "description": desc, "check": check,
            "model_bytes": (out / MODEL_FILE).stat().st_size, "seconds": time.monotonic() - start}


def quantize_embedder(fp32_dir: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> dict:
    """Write an int8 copy of an already exported fp32 embedder (no torch work); return its description."""
    src, out = Path(fp32_dir), Path(out_dir)
    desc = _read_json(src / DESCRIPTION_FILE, f"{src} has no {DESCRIPTION_FILE}; export it first")
    if not isinstance(desc, dict) or desc.get("format") != FORMAT or desc.get("quantized") is not None:
        raise ExportError(f"{src / DESCRIPTION_FILE} does not describe an fp32 {FORMAT}")
    with building_dir(out, force) as tmp:
        quantize_int8(src / desc["model_file"], tmp / MODEL_FILE)
        shutil.copyfile(src / desc["tokenizer_file"], tmp / TOKENIZER_FILE)
        desc = {**desc, "model_file": MODEL_FILE, "tokenizer_file": TOKENIZER_FILE, "quantized": "int8",
                "quantization": INT8_SCHEME}
        (tmp / DESCRIPTION_FILE).write_bytes(orjson.dumps(desc, option=orjson.OPT_INDENT_2))
    return desc


def _export_into(tmp: Path, src: SourceModel, *, int8: bool, max_length: int | None, source: str | None,
                 bar: Progress) -> tuple[dict, dict]:
    model = _load_backbone(src)
    bar.update(1, postfix="loaded")
    limit = _max_length(src, model.config, max_length)
    tokenizer_path = _write_tokenizer(src, tmp / TOKENIZER_FILE)
    parameters = inspect.signature(model.forward).parameters
    takes_types = "token_type_ids" in parameters
    if src.pooling == "last" and "position_ids" not in parameters:
        raise ExportError(f"last-token pooling needs a model that takes position_ids (a decoder); "
                          f"{type(model).__name__} does not")
    encoder = SentenceEncoder(model, src.pooling).eval()
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])

    fp32_path = tmp / (".fp32.onnx" if int8 else MODEL_FILE)
    _torch_export(encoder, fp32_path, input_names)
    bar.update(1, postfix="exported")

    feed = _check_batch(tokenizer_path, limit, input_names)
    with torch.no_grad():
        expected = encoder(*(torch.from_numpy(feed[n]) for n in input_names)).numpy()
    got = _run_onnx(fp32_path, feed)
    check = {"fp32_max_abs_diff": float(np.abs(got - expected).max())}
    if not check["fp32_max_abs_diff"] <= CHECK_TOLERANCE:
        raise ExportError(f"the exported graph disagrees with torch by {check['fp32_max_abs_diff']:.2e} "
                          f"(tolerance {CHECK_TOLERANCE:g}); the model uses an operation the ONNX export "
                          "does not reproduce")
    dimension = got.shape[1]
    if src.pooling_dimension is not None and src.pooling_dimension != dimension:
        raise ExportError(f"1_Pooling says word_embedding_dimension={src.pooling_dimension} but the model "
                          f"produces {dimension}; the folder mixes files from different models")
    bar.update(1, postfix="checked")

    if int8:
        quantize_int8(fp32_path, tmp / MODEL_FILE)
        fp32_path.unlink()
        cos = (_run_onnx(tmp / MODEL_FILE, feed) * got).sum(axis=1)
        check["int8_min_cosine"] = float(cos.min())
        bar.update(1, postfix="quantised")

    desc = _description(src, dimension=dimension, max_length=limit, input_names=input_names,
                        int8=int8, source=source or guess_source_name(src.root))
    (tmp / DESCRIPTION_FILE).write_bytes(orjson.dumps(desc, option=orjson.OPT_INDENT_2))
    bar.update(1, postfix="written")
    return desc, check


def _description(src: SourceModel, *, dimension: int, max_length: int, input_names: list[str],
                 int8: bool, source: str) -> dict:
    desc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "tokenizer_file": TOKENIZER_FILE,
        "dimension": int(dimension),
        "max_length": int(max_length),
        "pooling": src.pooling,
        "query_prefix": src.query_prefix,
        "normalized": True,
        # "modules.json" when the source model normalises; "exporter" when we added it so
        # that every embedder the runtime sees returns unit vectors (cosine is unchanged).
        "normalize_from": "modules.json" if src.has_normalize else "exporter",
        "quantized": "int8" if int8 else None,
        "input_names": input_names,
        "output_name": OUTPUT_NAME,
        "source": source,
        "opset": OPSET,
        "exporter": f"torch {torch.__version__} (torch.onnx, dynamo)",
    }
    if int8:
        desc["quantization"] = INT8_SCHEME
    return desc


# -- reading the source folder -----------------------------------------------------------

def read_source(root: Path) -> SourceModel:
    """Validate the sentence-transformers layout; raise ExportError naming what is missing."""
    if not root.is_dir():
        raise ExportError(f"{root} is not a directory")
    modules = _read_json(root / "modules.json", f"{root} is not a sentence-transformers model: "
                         "it has no modules.json (expected Transformer, Pooling and optionally Normalize)")
    if not isinstance(modules, list):
        raise ExportError(f"{root / 'modules.json'} should hold a list of modules")
    kinds = {}
    for entry in modules:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1] if isinstance(entry, dict) else ""
        if kind not in (_TRANSFORMER, _POOLING, _NORMALIZE):
            kind = entry.get("type") if isinstance(entry, dict) else entry
            raise ExportError(f"{root / 'modules.json'} has a module of type {kind!r}; "
                              f"only Transformer, Pooling and Normalize are supported")
        kinds[kind] = root / str(entry.get("path", ""))
    for needed in (_TRANSFORMER, _POOLING):
        if needed not in kinds:
            raise ExportError(f"{root / 'modules.json'} has no {needed} module; "
                              "this is not a sentence-transformers encoder the exporter can handle")
    transformer_dir = kinds[_TRANSFORMER]
    if not (transformer_dir / "config.json").is_file():
        raise CheckpointError(f"{transformer_dir / 'config.json'} is missing: the Transformer module has no config")
    pooling, pooling_dim = _read_pooling(kinds[_POOLING] / "config.json")
    st_config = _read_json(transformer_dir / "sentence_bert_config.json", None) or {}
    tok = transformer_dir / TOKENIZER_FILE
    return SourceModel(root=root, transformer_dir=transformer_dir, pooling=pooling,
                       has_normalize=_NORMALIZE in kinds, max_seq_length=st_config.get("max_seq_length"),
                       pooling_dimension=pooling_dim, tokenizer_file=tok if tok.is_file() else None,
                       query_prefix=_query_prompt(root / "config_sentence_transformers.json"))


def _query_prompt(path: Path) -> str | None:
    """sentence-transformers' `prompts["query"]`: the instruction its users put before a query."""
    cfg = _read_json(path, None) or {}
    prompts = cfg.get("prompts") if isinstance(cfg, dict) else None
    query = prompts.get("query") if isinstance(prompts, dict) else None
    if query is not None and not isinstance(query, str):
        raise ExportError(f"{path}: prompts.query should be a string, got {type(query).__name__}")
    return query or None


def _read_pooling(path: Path) -> tuple[str, int | None]:
    cfg = _read_json(path, f"{path} is missing: the Pooling module has no config")
    suffixes = [key[len("pooling_mode_"):] for key, on in cfg.items() if key.startswith("pooling_mode_") and on is True]
    modes = [_POOLING_KEYS.get(s, s.removesuffix("_tokens").removesuffix("_token")) for s in suffixes]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ExportError(f"{path} asks for pooling {modes or 'none'}; the exporter supports exactly one "
                          f"of {', '.join(POOLING_MODES)}")
    return modes[0], cfg.get("word_embedding_dimension")


def _read_json(path: Path, missing_message: str | None):
    if not path.is_file():
        if missing_message is None:
            return None
        raise ExportError(missing_message)
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from None


def guess_source_name(root: Path) -> str:
    """The hub name a model card uses for itself, else the folder's name."""
    readme = root / "README.md"
    if readme.is_file():
        found = re.search(r"SentenceTransformer\(\s*['\"]([\w.\-]+/[\w.\-]+)['\"]",
                          readme.read_text(encoding="utf-8", errors="replace"))
        if found:
            return found.group(1)
    return root.resolve().name


def _max_length(src: SourceModel, config, requested: int | None) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    limit = requested or src.max_seq_length or positions
    if not isinstance(limit, int) or limit < 2:
        raise ExportError(f"max_length must be an integer >= 2, got {limit!r}")
    if positions is not None and limit > positions:
        raise ExportError(f"max_length {limit} exceeds the model's {positions} position embeddings")
    return limit


def _load_backbone(src: SourceModel):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own Progress reports the step
    try:
        try:
            model = AutoModel.from_pretrained(src.transformer_dir, local_files_only=True,
                                              attn_implementation="sdpa")
        except ValueError as exc:
            if "sdpa" not in str(exc).lower():
                raise
            model = AutoModel.from_pretrained(src.transformer_dir, local_files_only=True,
                                              attn_implementation="eager")
    except Exception as exc:  # transformers and safetensors raise many types for one meaning
        raise CheckpointError(f"cannot load the transformer in {src.transformer_dir}: {exc}") from exc
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.float().eval()


def _write_tokenizer(src: SourceModel, dest: Path) -> Path:
    if src.tokenizer_file is not None:
        shutil.copyfile(src.tokenizer_file, dest)
        return dest
    # Older folders only have vocab.txt: let transformers build the fast tokenizer.
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src.transformer_dir, local_files_only=True, use_fast=True)
        tok.backend_tokenizer.save(str(dest))
    except Exception as exc:  # any failure here means the same thing to the user
        raise TokenizerExportError(f"{src.transformer_dir} has no tokenizer.json and no tokenizer "
                                   f"transformers can convert: {exc}") from exc
    return dest


# -- graph -------------------------------------------------------------------------------

class SentenceEncoder(torch.nn.Module):
    """Backbone + pooling + L2 normalisation, computed as sentence-transformers does."""

    def __init__(self, backbone, pooling: str):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.pooling == "last":
            # Positions count kept tokens only, so left padding does not shift a row's positions.
            kwargs["position_ids"] = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        tokens = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "last":
            pooled = tokens[torch.arange(tokens.shape[0]), last_kept(attention_mask)]
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def last_kept(attention_mask):
    """Index of each row's last kept token, whichever side the row is padded on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device, dtype=torch.float32)
    return (attention_mask.to(torch.float32) * positions).argmax(dim=1)  # float: ArgMax has no int64 kernel everywhere


def _torch_export(encoder, path: Path, input_names: list[str]) -> None:
    # Batch 2 x 16 so that neither axis is specialised to a constant 0/1 during tracing.
    example = tuple(torch.ones((2, 16), dtype=torch.long) for _ in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes[OUTPUT_NAME] = {0: "batch"}
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # hides "torchvision is not installed" notices
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, example, str(path), input_names=input_names,
                              output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=True, external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx could not export the model: {type(exc).__name__}: {exc}") from exc
    finally:
        onnx_log.setLevel(level)
    if not path.is_file():
        raise ExportError(f"torch.onnx reported success but wrote no {path.name}")


def quantize_int8(fp32_path: Path, out_path: Path) -> None:
    """Dynamic int8 quantisation; see INT8_SCHEME for what is and is not quantised."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    # Per-tensor uint8 activations lose too much on GELU outputs (long-tailed); measured on
    # all-MiniLM-L6-v2: mean cosine to fp32 0.989 with them quantised, 0.994 without.
    keep_fp32 = [node.name for node in graph.node
                 if node.op_type == "MatMul" and node.input[0] in producer
                 and producer[node.input[0]].op_type == "Gelu"]
    root = logging.getLogger()
    quiet = _DropMessage("pre-processing before quantization")
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=keep_fp32)
    except Exception as exc:
        raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
    finally:
        root.removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Hides onnxruntime's advice to pre-process (its shape inference fails on these graphs)."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# -- the built-in check ------------------------------------------------------------------

def _check_batch(tokenizer_path: Path, max_length: int, input_names: list[str]) -> dict:
    """A padded batch of two texts, one truncated to max_length, tokenised as the runtime does."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(max_length)
    encodings = tok.encode_batch(list(_CHECK_TEXTS))
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, :len(enc.ids)] = enc.ids
        mask[row, :len(enc.ids)] = 1
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: arrays[name] for name in input_names}


def _run_onnx(path: Path, feed: dict):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], feed)[0]
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot run the exported {path.name}: {exc}") from exc
