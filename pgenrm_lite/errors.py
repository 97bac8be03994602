"""Every error the project raises on purpose, in one place.

Each message says what was wrong and how to mend it. All derive from
`PgenrmError`, so a host app can catch the library's failures with one clause.
"""

from __future__ import annotations


class PgenrmError(Exception):
    """Base class of every error raised by pgenrm-lite."""


class ConfigError(PgenrmError, ValueError):
    """An argument or setting is invalid (sample counts, device, template...)."""


class RecordError(PgenrmError, ValueError):
    """A record (preference pair, user profile, manifest...) failed validation."""


class DataFormatError(RecordError):
    """A data file has a malformed line; carries the file, line number and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.field = field


class ChainParseError(PgenrmError, ValueError):
    """Generated text does not meet the output contract; `raw` holds the text."""

    def __init__(self, message: str, raw: str):
        super().__init__(message)
        self.raw = raw


class ContextOverflowError(PgenrmError):
    """Even the shortest allowed prompt plus `max_tokens` does not fit the context window."""

    def __init__(self, message: str, *, n_prompt_tokens: int, max_tokens: int, n_ctx: int):
        super().__init__(message)
        self.n_prompt_tokens = n_prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class EngineError(PgenrmError, RuntimeError):
    """llama.cpp could not load the model or evaluate a batch."""


class ClosedError(EngineError):
    """A call on a Scorer or engine after `close()`; open a new one."""


class CacheFileError(PgenrmError):
    """A prompt-cache file is truncated, corrupted or written for another key (model, template,
    prefix, llama.cpp build); it is never loaded, and the prefix is evaluated and saved again."""


class EmbedderError(PgenrmError, RuntimeError):
    """The ONNX sentence embedder could not be loaded or run."""


class PrototypeIndexError(PgenrmError):
    """The prototype index is inconsistent with the manifest or the embedder."""


class BundleError(PgenrmError):
    """A bundle directory is missing, incomplete or not trustworthy."""


class BundleVersionError(BundleError):
    """The manifest's schema version is not one this runtime knows."""


class BundleIntegrityError(BundleError):
    """A bundle file's size, hash or header does not match the manifest."""


class ExportError(PgenrmError):
    """The export toolchain could not convert its input."""


class UnsupportedArchitectureError(ExportError):
    """The checkpoint's architecture is not one the converter knows."""


class TokenizerExportError(ExportError):
    """The tokenizer is missing or cannot be represented in GGUF."""


class CheckpointError(ExportError):
    """A checkpoint file is missing, truncated or malformed."""
