"""A dependency-free progress bar: drawn on a terminal, silent when piped."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """`with Progress(total, "converting") as bar: bar.update(1)`.

    Draws to stderr only when stderr is a terminal, at most ten times a second.
    """

    def __init__(self, total: int | None, desc: str = "", *, stream: IO[str] | None = None,
                 unit: str = "it", enabled: bool | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self._start = time.monotonic()
        self._last_draw = 0.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, *, postfix: str = "") -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1 and (self.total is None or self.n < self.total):
            return
        self._last_draw = now
        self._draw(postfix)

    def _draw(self, postfix: str = "") -> None:
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, self.n / self.total)
            filled = int(frac * 24)
            bar = "#" * filled + "-" * (24 - filled)
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            line = (f"{self.desc} [{bar}] {self.n}/{self.total} {self.unit} "
                    f"{rate:.1f}/s eta {eta:.0f}s {postfix}")
        else:
            line = f"{self.desc} {self.n} {self.unit} {rate:.1f}/s {postfix}"
        self.stream.write("\r" + line[:120].ljust(120))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
