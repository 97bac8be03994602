"""`python -m export quantize`: re-quantise a GGUF file with llama.cpp's own quantiser.

    python -m export quantize --input model-q4_1.gguf --output model-q8_0.gguf --type q8_0

The weights are dequantised and quantised again, so the output carries both
quantisations' errors; check the result against the input with `python -m export check-quant`.
The output is written to a temporary file and renamed, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

from pgenrm_lite._atomic import atomic_path
from pgenrm_lite.errors import ConfigError, ExportError

# llama.cpp's llama_ftype values (include/llama.h)
TYPES: dict[str, int] = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15,
                         "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25}


def quantize(src: Path, dst: Path, type_name: str, *, threads: int | None = None) -> Path:
    """Write `src` re-quantised to `type_name` at `dst` (atomically); return `dst`."""
    import llama_cpp

    if type_name not in TYPES:
        raise ConfigError(f"unknown quantisation type {type_name!r}; known: {', '.join(TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"{src} does not exist")
    if src.resolve() == dst.resolve():
        raise ConfigError("--output must differ from --input")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[type_name]
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True
    with atomic_path(dst) as tmp:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise ExportError(f"llama.cpp could not quantise {src} to {type_name}")
    return dst


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=Path, required=True, help="GGUF file to re-quantise")
    p.add_argument("--output", type=Path, required=True, help="GGUF file to write")
    p.add_argument("--type", choices=sorted(TYPES), required=True)
    p.add_argument("--threads", type=int, default=None)


def run(args) -> int:
    t0 = time.monotonic()
    out = quantize(args.input, args.output, args.type, threads=args.threads)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type}) in {time.monotonic() - t0:.1f}s")
    return 0
