"""One llama.cpp context on a loaded model: its KV memory, its batch, and the operations on them.

Owns the llama_context and llama_batch pointers (freed by `close`); borrows the model's.
Sequences are numbered 0..n_seq_max-1; a batch item is (token, position, sequence, logits?).
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from ._llama import llama_cpp
from .errors import EngineError
from .llama_model import LlamaModel

BatchItem = tuple[int, int, int, bool]  # token, position, sequence id, whether to keep its logits


class Batch:
    """A llama_batch of up to `capacity` tokens, one sequence id each."""

    def __init__(self, capacity: int, n_seq_max: int):
        self.capacity = capacity
        self.ptr = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)

    def fill(self, items: Sequence[BatchItem]) -> None:
        b = self.ptr
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)

    @property
    def n_tokens(self) -> int:
        return self.ptr.n_tokens

    def close(self) -> None:
        if getattr(self, "ptr", None) is not None:
            llama_cpp.llama_batch_free(self.ptr)
            self.ptr = None


class LlamaContext:
    """A context sized for batched sampling: decode batches, copy, drop, save and restore sequences."""

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int,
                 kv_unified: bool, flash_attn: bool):
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        # Unified: one KV pool shared by all sequences, so copied prompt cells are stored once,
        # but every sequence's attention steps over every cell in use (other sequences' cells
        # are masked, not skipped for free). Split: each sequence owns n_ctx / n_seq_max cells
        # and attends over its own only; prompts are copied per sequence (more memory).
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.no_perf = True
        ptr = llama_cpp.llama_init_from_model(model.ptr, cparams)
        if not ptr:
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for "
                              f"{model.path}; lower n_ctx or n_seq_max")
        self.ptr = ptr
        self.n_vocab = model.n_vocab
        self._mem = llama_cpp.llama_get_memory(ptr)
        self.n_ctx = llama_cpp.llama_n_ctx(ptr)
        self.n_batch = llama_cpp.llama_n_batch(ptr)  # llama.cpp clamps it to n_ctx: a larger chunk would abort
        self.n_seq_max = n_seq_max
        self.kv_unified = kv_unified
        # Cells one sequence can hold: the whole context, or its own stream.
        self.n_ctx_seq = self.n_ctx if kv_unified else self.n_ctx // n_seq_max
        self.batch = Batch(max(n_batch, n_seq_max), n_seq_max)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.batch.close()
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    @property
    def is_open(self) -> bool:
        return bool(getattr(self, "ptr", None))

    # -- batches ---------------------------------------------------------------------

    def decode(self, items: Sequence[BatchItem] | None = None) -> None:
        """Evaluate `items` (or the batch as last filled) and keep the logits they asked for."""
        if items is not None:
            self.batch.fill(items)
        rc = llama_cpp.llama_decode(self.ptr, self.batch.ptr)
        if rc == 1:
            raise EngineError("llama.cpp found no free KV slot; the context is too small for this "
                              "batch (load with a larger n_ctx or lower the sample count)")
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")

    def logits(self, row: int) -> np.ndarray:
        """The last batch's logits at `row` (a view, valid until the next decode)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ptr, row), shape=(self.n_vocab,))

    def all_logits(self, n_rows: int) -> np.ndarray:
        """The last batch's logits, [n_rows, n_vocab], when every item asked for them (a view)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ptr), shape=(n_rows, self.n_vocab))

    def eval_span(self, seq: int, tokens: Sequence[int], start: int = 0, *, logits_last: bool = True) -> int:
        """Evaluate tokens[start:] into `seq` at their positions, n_batch at a time. Returns the count."""
        end = len(tokens)
        pos = start
        while pos < end:
            chunk = tokens[pos:pos + self.n_batch]
            self.decode([(tok, pos + i, seq, logits_last and pos + i == end - 1) for i, tok in enumerate(chunk)])
            pos += len(chunk)
        return end - start

    # -- sequences -------------------------------------------------------------------

    def clear(self) -> None:
        """Empty the memory: every sequence, every cell."""
        llama_cpp.llama_memory_clear(self._mem, True)

    def seq_copy(self, src: int, dst: int, n: int | None = None) -> None:
        """Give `dst` the cells of `src` at positions [0, n) (all of them when n is None).

        Across split streams llama.cpp copies whole streams only, so copy all, then drop the tail.
        """
        if n is None:
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        elif self.kv_unified:
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, 0, n)
        else:
            llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, dst, n, -1)

    def seq_remove(self, seq: int, start: int = -1, end: int = -1) -> None:
        """Drop the cells of `seq` at positions [start, end) (-1: open end; both -1: all)."""
        llama_cpp.llama_memory_seq_rm(self._mem, seq, start, end)

    def save(self, seq: int) -> bytes:
        """The state (cells and values) of sequence `seq`, as bytes `restore` takes."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq)
        if n != size:
            raise EngineError(f"llama.cpp saved {n} of {size} bytes of a sequence state")
        return bytes(buf)

    def restore(self, data: bytes, seq: int) -> None:
        buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))  # no copy; llama.cpp only reads
        if llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(data), seq) != len(data):
            raise EngineError("llama.cpp could not restore a saved prompt prefix (no free KV slot, or "
                              "a state from another model or context); load with a larger n_ctx")
