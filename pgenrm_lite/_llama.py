"""llama.cpp's Python binding, loaded once with this project's process settings."""

from __future__ import annotations

import logging
import os

# llama.cpp's CPU backend (built with OpenMP) spins idle worker threads by default. On cores
# shared with other busy processes that turns each decode step into a wait for a descheduled
# spinner: one SmolLM2 compare took 344 s with 2 spinning threads and 9 s with passive ones
# (2 cores, load average 4). Passive waiting is the default here; a caller's own setting wins.
# It must be set before llama.cpp's library (and with it libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp  # noqa: E402

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

__all__ = ["llama_cpp"]
