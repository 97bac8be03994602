"""The ONNX sentence embedder at run time: onnxruntime + tokenizers, nothing heavier.

Reads a directory written by `python -m export onnx-embedder`: `embedder.json` (the
description), the ONNX graph (pooling and normalisation inside it) and `tokenizer.json`.
The inputs fed to the graph are the ones the graph declares, so a model without
token_type_ids works the same way. Rows are padded on the right by default; a
last-token-pooling graph finds each row's last kept token from the mask and derives
positions from it, so `padding_side="left"` gives the same vectors (mean and CLS graphs
take positions from the row start, so they refuse left padding). Texts embedded with
`query=True` get the description's `query_prefix` first. Knows nothing of P-GenRM.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import onnxruntime as ort
import orjson
from tokenizers import Tokenizer

from .errors import ConfigError, EmbedderError

DESCRIPTION_FILE = "embedder.json"
FORMAT = "pgenrm-lite-embedder"
SUPPORTED_VERSION = 1
DEVICES = ("auto", "cpu", "gpu")
KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PADDING_SIDES = ("right", "left")
_CPU, _CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_NUMPY_INT: dict[str, type] = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class Embedder:
    """`Embedder.from_dir(path).embed(["some text", ...])` -> float32 [n, dim], unit rows."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, description: dict, *,
                 source: Path | None = None, padding_side: str = "right"):
        self._session = session
        self._tokenizer = tokenizer
        self._description = description
        self._source = source
        self._output = description["output_name"]
        self._inputs = _graph_inputs(session, source)
        self._dimension = _graph_dimension(session, self._output, description["dimension"], source)
        self._max_length = int(description["max_length"])
        self._pad_id = _pad_id(tokenizer)
        self._query_prefix = description.get("query_prefix") or ""
        if padding_side not in PADDING_SIDES:
            raise ConfigError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if padding_side == "left" and description.get("pooling") != "last":
            raise ConfigError(f"padding_side='left' needs a last-token-pooling embedder; this one pools by "
                              f"{description.get('pooling')!r} with positions counted from the row start")
        self._padding_side = padding_side
        tokenizer.no_padding()  # we pad per batch ourselves; tokenizer.json may ask for fixed padding
        tokenizer.enable_truncation(self._max_length)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                 padding_side: str = "right") -> "Embedder":
        """Load an exported embedder; `device` picks execution providers, `threads` the intra-op pool."""
        root = Path(path)
        if root.is_file() and root.name == DESCRIPTION_FILE:
            root = root.parent
        description = read_description(root)
        providers = choose_providers(device)
        options = _session_options(threads)
        model_path = _member(root, description["model_file"], "model_file")
        tokenizer_path = _member(root, description["tokenizer_file"], "tokenizer_file")
        try:
            session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped failures
            raise EmbedderError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        if device == "gpu" and _CUDA in providers and _CUDA not in session.get_providers():
            warnings.warn(f"device='gpu' was requested but onnxruntime could not start CUDA; the embedder "
                          f"runs on {session.get_providers()}", RuntimeWarning, stacklevel=2)
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise EmbedderError(f"{tokenizer_path} is not a tokenizers JSON file: {exc}") from exc
        return cls(session, tokenizer, description, source=root, padding_side=padding_side)

    # -- properties ------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def pooling(self) -> str | None:
        return self._description.get("pooling")

    @property
    def query_prefix(self) -> str:
        """Put before texts embedded with `query=True` ('' when the model asks for none)."""
        return self._query_prefix

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, preferred first."""
        return list(self._session.get_providers())

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self._inputs]

    @property
    def description(self) -> dict:
        return dict(self._description)

    # -- embedding -------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], batch_size: int = 32, *, query: bool = False) -> np.ndarray:
        """Embed `texts` in batches of similar length; rows come back in the given order.

        `query=True` marks them as queries: the model's `query_prefix` goes first.
        """
        texts = _check_texts(texts)
        if query and self._query_prefix:
            texts = [self._query_prefix + t for t in texts]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        out = np.empty((len(texts), self._dimension), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(texts)
        # Sorting by length keeps padding (wasted compute) small; `order` maps rows back.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._run([encodings[i].ids for i in rows])
        return out

    def _run(self, token_rows: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in token_rows)
        ids = np.full((len(token_rows), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(token_rows), width), dtype=np.int64)
        for row, tokens in enumerate(token_rows):
            cols = slice(width - len(tokens), width) if self._padding_side == "left" else slice(0, len(tokens))
            ids[row, cols] = tokens
            mask[row, cols] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feed: dict[str, np.ndarray] = {name: arrays[name].astype(dtype, copy=False) for name, dtype in self._inputs}
        try:
            result = self._session.run([self._output], feed)[0]
        except Exception as exc:
            raise EmbedderError(f"onnxruntime failed on a batch of {len(token_rows)} x {width} tokens: {exc}") from exc
        if result.shape != (len(token_rows), self._dimension):
            raise EmbedderError(f"the graph returned shape {result.shape}, expected "
                                f"({len(token_rows)}, {self._dimension}); re-export the embedder")
        return result


# -- loading helpers ---------------------------------------------------------------------------

def read_description(root: Path) -> dict:
    """Read and validate `embedder.json`; raise EmbedderError saying what is wrong."""
    if not root.is_dir():
        raise EmbedderError(f"embedder directory {root} does not exist; export one with "
                            "`python -m export onnx-embedder`")
    path = root / DESCRIPTION_FILE
    if not path.is_file():
        raise EmbedderError(f"{path} is missing; {root} is not an exported embedder "
                            "(`python -m export onnx-embedder` writes it)")
    try:
        desc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise EmbedderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise EmbedderError(f"{path} is not a {FORMAT} description (format field is "
                            f"{desc.get('format') if isinstance(desc, dict) else None!r})")
    if desc.get("version") != SUPPORTED_VERSION:
        raise EmbedderError(f"{path} has version {desc.get('version')!r}; this runtime reads version "
                            f"{SUPPORTED_VERSION}; re-export the embedder or upgrade pgenrm-lite")
    for key, kind in (("model_file", str), ("tokenizer_file", str), ("output_name", str),
                      ("dimension", int), ("max_length", int)):
        value = desc.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise EmbedderError(f"{path}: field {key!r} should be a "
                                f"{'positive integer' if kind is int else 'string'}, got {value!r}")
    prefix = desc.get("query_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise EmbedderError(f"{path}: field 'query_prefix' should be a string or null, got {prefix!r}")
    return desc


def _member(root: Path, name: str, field: str) -> Path:
    """A file named by the description, which must stay inside the embedder directory."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise EmbedderError(f"{root / DESCRIPTION_FILE}: {field} {name!r} must be a file inside the directory")
    path = root / rel
    if not path.is_file():
        raise EmbedderError(f"{path} is missing ({field} in {root / DESCRIPTION_FILE})")
    return path


def choose_providers(device: str) -> list[str]:
    """CUDA first when allowed and available; warn when a requested GPU cannot be used."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
    available = ort.get_available_providers()
    if device != "cpu" and _CUDA in available:
        return [_CUDA, _CPU]
    if device == "gpu":
        warnings.warn("device='gpu' was requested but this onnxruntime has no CUDAExecutionProvider "
                      "(install onnxruntime-gpu); the embedder runs on the CPU", RuntimeWarning, stacklevel=3)
    return [_CPU]


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # the graph is one chain of ops; no parallel branches to run
    return options


def _graph_inputs(session: ort.InferenceSession, source: Path | None) -> list[tuple[str, type]]:
    inputs = []
    for arg in session.get_inputs():
        if arg.name not in KNOWN_INPUTS:
            raise EmbedderError(f"the embedder graph in {source} asks for input {arg.name!r}; "
                                f"only {', '.join(KNOWN_INPUTS)} can be fed")
        if arg.type not in _NUMPY_INT:
            raise EmbedderError(f"the embedder graph in {source} wants {arg.name} as {arg.type}; "
                                "expected int64 or int32")
        inputs.append((arg.name, _NUMPY_INT[arg.type]))
    names = {name for name, _ in inputs}
    if not {"input_ids", "attention_mask"} <= names:
        raise EmbedderError(f"the embedder graph in {source} takes {sorted(names)}; it needs at least "
                            "input_ids and attention_mask")
    return inputs


def _graph_dimension(session: ort.InferenceSession, output: str, declared: int, source: Path | None) -> int:
    outputs = {arg.name: arg.shape for arg in session.get_outputs()}
    if output not in outputs:
        raise EmbedderError(f"{source}/{DESCRIPTION_FILE} names output {output!r} but the graph has "
                            f"{sorted(outputs)}")
    shape = outputs[output]
    if len(shape) != 2:
        raise EmbedderError(f"graph output {output!r} has shape {shape}; expected [batch, dimension]")
    if isinstance(shape[1], int) and shape[1] != declared:
        raise EmbedderError(f"{source}/{DESCRIPTION_FILE} says dimension {declared} but the graph's "
                            f"{output!r} has dimension {shape[1]}; the description does not match the model")
    return declared


def _pad_id(tokenizer: Tokenizer) -> int:
    """Any id works under the attention mask; prefer the tokenizer's own pad token."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    return 0


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ConfigError("embed() takes a sequence of strings; wrap a single text in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ConfigError(f"embed() item {i} is {type(text).__name__}, not str")
    return texts
