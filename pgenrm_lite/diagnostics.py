"""What `pgenrm-lite doctor` checks: how llama.cpp was built, and whether it can decode here.

The decode check runs in a child process, so that a build this CPU cannot run (llama.cpp's
AMX kernels die with SIGILL on some Xeon VMs that advertise AMX) ends the child with a
one-line diagnosis instead of the caller's process with no message.

    python -m pgenrm_lite.diagnostics MODEL.gguf [THREADS]    # the child: decode one token
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

BUILD_FLAGS_FILE = "llama-build-flags.txt"  # written into the venv by scripts/setup.sh
FIXES = {
    "SIGILL": "llama.cpp was compiled with instructions this CPU cannot run (on CPUs that advertise AMX: its "
              "AMX kernels); rebuild it with `bash scripts/setup.sh` (AMX kernels off by default), or with "
              "CFLAGS/CXXFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' and pip's --no-cache-dir",
    "SIGSEGV": "llama.cpp crashed while decoding; check that the model file is intact (`pgenrm-lite verify`) "
               "and rebuild llama-cpp-python with `bash scripts/setup.sh`",
}


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def build_features(info: str | None = None) -> dict[str, bool]:
    """ggml's compile-time CPU features, e.g. {'AVX2': True, 'AVX512': True, 'AMX_INT8': False, ...}."""
    info = system_info() if info is None else info
    out = {}
    for part in info.replace("|", "\n").splitlines():
        name, sep, value = part.partition("=")
        name = name.strip().split(":")[-1].strip()
        if sep and name and value.strip() in ("0", "1"):
            out[name] = value.strip() == "1"
    return out


def backends(info: str | None = None) -> dict[str, dict[str, str]]:
    """ggml's compiled backends and their settings, e.g. {'CUDA': {'ARCHS': '890', ...}, 'CPU': {...}}."""
    info = system_info() if info is None else info
    out: dict[str, dict[str, str]] = {}
    current = None
    for part in info.split("|"):
        head, sep, rest = part.partition(" : ")
        if sep:  # "CUDA : ARCHS = 890" opens a backend
            current = out.setdefault(head.strip(), {})
            part = rest
        name, eq, value = part.partition("=")
        if current is not None and eq and name.strip():
            current[name.strip()] = value.strip()
    return out


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_flags() -> str | None:
    """The flags scripts/setup.sh built llama-cpp-python with, when it did."""
    path = Path(sys.prefix) / BUILD_FLAGS_FILE
    try:
        return path.read_text().strip()
    except OSError:
        return None


def interpret_child(returncode: int, seconds: float, stderr: str = "") -> dict:
    """The decode check's report from the child's exit status."""
    report: dict = {"ok": returncode == 0, "returncode": returncode, "seconds": round(seconds, 2)}
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        report["signal"] = name
        report["message"] = (f"a one-token decode killed the process with {name}: "
                             + FIXES.get(name, "llama.cpp crashed; rebuild it with `bash scripts/setup.sh`"))
    elif returncode != 0:
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        report["message"] = f"the one-token decode failed (exit {returncode}): {last[0][:300]}"
    else:
        report["message"] = "a one-token decode ran"
    return report


def decode_check(model: Path, *, n_threads: int | None = None, timeout: float = 300.0) -> dict:
    """Load `model` and decode one token in a child process; report how it ended."""
    cmd = [sys.executable, "-m", "pgenrm_lite.diagnostics", str(model), str(n_threads or 0)]
    return run_child(cmd, timeout=timeout)


def run_child(cmd: list[str], *, timeout: float = 300.0) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "returncode": None, "seconds": round(time.perf_counter() - start, 2),
                "message": f"the one-token decode did not finish in {timeout:.0f} s"}
    return interpret_child(done.returncode, time.perf_counter() - start, done.stderr)


def _child(model: str, n_threads: int) -> int:
    from .engine import Engine, Request, SamplingParams

    with Engine(model, n_ctx=256, n_threads=n_threads or None) as engine:
        prompt = tuple(engine.tokenize("Hello", add_special=True)) or (0,)
        engine.generate([Request(prompt, (0,))], SamplingParams(max_tokens=1, temperature=0))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
