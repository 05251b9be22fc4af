"""One progress line on stderr: count, images/s, MB/s, ETA.

On a terminal the line is redrawn in place (at most ``interval`` apart); elsewhere (logs,
CI) a full line is printed every ``log_interval`` seconds. ``write()`` prints a message
(e.g. a warning) without tearing the line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` style duration."""
    seconds = int(round(max(seconds, 0.0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Throughput and ETA of a long job, drawn on one line.

    ``total`` may be None (unknown length: no percentage, no ETA). ``initial`` counts work
    done before this run (e.g. on resume); rates use only this run's work.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        initial: int = 0,
        unit: str = "img",
        stream: TextIO | None = None,
        enabled: bool = True,
        interval: float = 0.2,
        log_interval: float = 10.0,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.interval = interval if self.tty else log_interval
        self.initial = self.count = initial
        self.nbytes = 0
        self.start = self._last = time.perf_counter()
        self._drawn = False

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        """Count ``n`` more items of ``nbytes`` bytes in all; redraw if it is time."""
        self.count += n
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The progress text: ``label  done/total unit  pct  img/s  MB/s  ETA``."""
        elapsed = max((now if now is not None else time.perf_counter()) - self.start, 1e-9)
        done = self.count - self.initial
        rate = done / elapsed
        parts = [self.label]
        if self.total:
            parts.append(f"{self.count:,}/{self.total:,} {self.unit}  {100.0 * self.count / self.total:5.1f}%")
        else:
            parts.append(f"{self.count:,} {self.unit}")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        if self.nbytes:
            parts.append(f"{self.nbytes / elapsed / 1e6:,.1f} MB/s")
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.count) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        return "  ".join(parts)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line, keeping the progress line intact below it."""
        if self._drawn and self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(message + "\n")
        if self._drawn and self.tty:
            self.stream.write(self.line())
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled and (self._drawn or self.tty):
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def _draw(self, now: float) -> None:
        text = self.line(now)
        self.stream.write(f"\r\033[K{text}" if self.tty else text + "\n")
        self.stream.flush()
        self._drawn = True
