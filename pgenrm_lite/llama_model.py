"""A loaded GGUF model: weights, vocabulary, tokenization, metadata and chat template.

Owns the llama_model pointer (freed by `close`); contexts borrow it (see llama_context).
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Sequence

from ._llama import llama_cpp
from .chat import ChatFormatter
from .errors import ClosedError, ConfigError, EngineError

if TYPE_CHECKING:
    from .digit_readout import DigitTokens

DEVICES = ("auto", "cpu", "gpu")


def resolve_device(device: str) -> str:
    """"cpu" or "gpu": where this llama.cpp build will run the model for the requested device."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
    gpu_ok = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "gpu" and not gpu_ok:
        if "CUDA :" in llama_cpp.llama_print_system_info().decode("utf-8", "replace"):
            raise ConfigError("device='gpu' was requested; this llama-cpp-python build has CUDA but found no "
                              "usable GPU (no NVIDIA driver, or one older than the CUDA runtime it was built "
                              "with); check `nvidia-smi`, or use device='cpu' / 'auto'")
        raise ConfigError("device='gpu' was requested but this llama-cpp-python build has no GPU "
                          "offload; rebuild it with `bash scripts/setup.sh --cuda` "
                          "(or CMAKE_ARGS for Metal/Vulkan), "
                          "or use device='cpu' / 'auto'")
    return "gpu" if (device in ("gpu", "auto") and gpu_ok) else "cpu"


class LlamaModel:
    """The model's weights and vocabulary; text <-> tokens and the chat template."""

    def __init__(self, path: str, *, device: str, chat_template: str | None = None):
        """`device` is a resolved one ("cpu" or "gpu"); `chat_template` overrides the file's own."""
        self.path = path
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = -1 if device == "gpu" else 0
        mparams.use_mmap = True
        ptr = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not ptr:
            raise EngineError(f"llama.cpp could not load {path}: the file is not a GGUF "
                              "model this build supports (re-export it with `python -m export gguf`)")
        self.ptr = ptr
        try:
            self._describe(chat_template)
        except BaseException:
            self.close()
            raise

    def _describe(self, chat_template: str | None) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self._piece_buf = ctypes.create_string_buffer(256)
        self.digit_tokens: DigitTokens | None = None  # the vocabulary's digits, found on first use (see digit_readout)
        # An override wins over the template the GGUF file carries (e.g. a file without one).
        self.chat_template = chat_template or self.meta("tokenizer.chat_template")
        self.architecture = self.meta("general.architecture") or "unknown"
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.bos_id = bos if (bos >= 0 and llama_cpp.llama_vocab_get_add_bos(self.vocab)) else None
        self.chat = ChatFormatter(
            self.chat_template,
            bos_token=self.token_bytes(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            eos_token=self.token_bytes(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    @property
    def is_open(self) -> bool:
        return bool(getattr(self, "ptr", None))

    def require_open(self) -> None:
        # llama.cpp aborts the process on a freed model; refuse first.
        if not self.is_open:
            raise ClosedError("this engine was closed; load the model again")

    def meta(self, key: str) -> str | None:
        """A metadata value of the GGUF file, as text; None where absent."""
        size = 1 << 16
        for _ in range(3):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1
        return None

    # -- tokens ----------------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        """A control token: one that only template text (parse_special) can produce."""
        return bool(llama_cpp.llama_vocab_is_control(self.vocab, token))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        self.require_open()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError("llama.cpp failed to tokenize the prompt")
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        self.require_open()
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", "replace")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # -- chat ------------------------------------------------------------------------

    def chat_tokens(self, messages: Sequence[dict]) -> tuple[int, ...]:
        """Prompt tokens for chat messages, ending with the assistant's generation prompt."""
        return tuple(self.chat.tokenize(messages, self.tokenize, is_control=self.is_control,
                                        token_text=self.token_text, bos_id=self.bos_id))

    def render_chat(self, messages: Sequence[dict]) -> str:
        """The chat template's output as one string (what transformers' apply_chat_template writes)."""
        return self.chat.render(self.chat.fit_roles(messages))


def model_stat_id(path: str) -> str:
    """A memory-only name for a model file: its path, size and modification time."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
