"""Opening what a Scorer runs on: a bundle's (or a bare GGUF file's) model with its chat template and
a context sized for the options, and the bundle's prototype index when neighbours are asked for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import protocol
from .bundle import Bundle, model_file_ok
from .errors import ConfigError
from .options import ScorerOptions


@dataclass
class Loaded:
    """A loaded model and what goes with it; `close` frees what was opened."""

    engine: Any
    options: ScorerOptions  # the options given, over the bundle's recommended ones
    template: protocol.Template
    prototypes: Any = None
    bundle: Optional[Bundle] = None

    def close(self) -> None:
        self.engine.close()
        if self.prototypes is not None:
            self.prototypes.close()


def open_bundle(path: str | os.PathLike, given: ScorerOptions, *, make_engine: Callable[..., Any], device: str,
                n_ctx: Optional[int], n_threads: Optional[int], verify: str,
                chat_template: str | os.PathLike | None, model: str | os.PathLike | None, template) -> Loaded:
    """Verify and open a bundle; load its model (or `model`, a GGUF file in its place) and, for
    n_neighbors > 0, its prototype index. Options not given fall back to the bundle's recommended ones."""
    bundle = Bundle.open(path, verify=verify)  # type: ignore[arg-type]
    options = ScorerOptions.merge(ScorerOptions.manifest_defaults(bundle.manifest.defaults), given)
    template = protocol.resolve_template(template or bundle.manifest.template)
    max_tokens = options.max_tokens or template.output_contract.max_tokens
    if chat_template is None:
        chat_template = bundle.chat_template()
    llm_path = bundle.llm_path
    # The manifest's hash names the model in prompt-cache keys; another file is hashed itself.
    llm_entry = next((f for f in bundle.manifest.files if f.path == bundle.manifest.llm.file), None)
    model_id = f"{llm_entry.sha256}:{llm_entry.size}" if llm_entry else None
    if model is not None:
        llm_path, model_id = Path(model), None
        if not model_file_ok(llm_path):
            raise ConfigError(f"{llm_path} is not a readable GGUF v2/v3 file")
    engine = make_engine(llm_path, n_ctx=n_ctx or auto_n_ctx(options.n_samples + options.n_neighbors, max_tokens),
                         n_threads=n_threads, device=device, chat_template=template_text(chat_template),
                         model_id=model_id)
    loaded = Loaded(engine, options, template, bundle=bundle)
    if options.n_neighbors > 0 and bundle.manifest.prototypes is not None:
        try:
            from .prototypes import PrototypeIndex

            loaded.prototypes = PrototypeIndex.from_bundle(bundle, device=device, n_threads=n_threads)
        except BaseException:
            engine.close()
            raise
    return loaded


def open_gguf(path: str | os.PathLike, given: ScorerOptions, *, make_engine: Callable[..., Any], device: str,
              n_ctx: Optional[int], n_threads: Optional[int], chat_template: str | os.PathLike | None,
              template) -> Loaded:
    """Load a bare GGUF file (no bundle: no recommended options, no prototypes)."""
    path = Path(path)
    if not model_file_ok(path):
        raise ConfigError(f"{path} is not a readable GGUF v2/v3 file")
    template = protocol.resolve_template(template)
    max_tokens = given.max_tokens or template.output_contract.max_tokens
    engine = make_engine(path, n_ctx=n_ctx or auto_n_ctx(given.n_samples, max_tokens), n_threads=n_threads,
                         device=device, chat_template=template_text(chat_template))
    return Loaded(engine, given, template)


def bundled_prototypes(bundle: Optional[Bundle], engine):
    """The bundle's prototype index on the engine's device, or None when there is no such index."""
    if bundle is None or not bundle.manifest.prototypes:
        return None
    from .prototypes import PrototypeIndex

    return PrototypeIndex.from_bundle(bundle, device=engine.device, n_threads=engine.n_threads)


def template_text(chat_template: str | os.PathLike | None) -> str | None:
    """A chat template given as Jinja text or as a path to a file holding it."""
    if chat_template is None:
        return None
    if isinstance(chat_template, os.PathLike) or ("{" not in chat_template and len(chat_template) < 4096):
        path = Path(chat_template)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"chat_template={str(chat_template)!r} is neither Jinja template text nor a "
                              f"readable UTF-8 file ({exc})") from exc
    return chat_template


def auto_n_ctx(n_sequences: int, max_tokens: int) -> int:
    """Room for a long prompt plus every sample's budget, rounded up to 256, capped at 32k."""
    need = 4096 + max(1, n_sequences) * max_tokens
    return min(32768, (need + 255) // 256 * 256)
