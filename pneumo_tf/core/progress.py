"""Progress on stderr for long loops: a live bar on a terminal, plain periodic lines elsewhere.

``Progress(total, "epoch 3", unit="step", images_per_unit=32)`` then ``update(done, loss=0.21)``
after each step, and ``close()``. On a terminal the bar is redrawn in place at most five times a
second (``epoch 3 [#########     ] 120/260 step  312 img/s  ETA 0:45  loss 0.2100``); when stderr
is not a terminal (CI logs, ``nohup``) a full line is written every :data:`PLAIN_EVERY_S` seconds
and when the work is done, so a log shows the run is alive without filling up.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
REDRAW_S = 0.2
PLAIN_EVERY_S = 30.0


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``; ``nan`` -> ``?``."""
    if not seconds == seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A progress display for ``total`` units of work (see the module docstring).

    Args:
        total: units to do (steps, batches, images); 0 or None shows counts without a bar.
        label: what is progressing (``epoch 3``, ``validation``, ``predict``).
        unit: name of a unit, for the count.
        images_per_unit: images in one unit, for the images/s figure (1 when units are images).
        stream: where to write (default stderr); enabled: False shows nothing.
    """

    def __init__(self, total: int | None, label: str, unit: str = "img",
                 images_per_unit: int = 1, stream: TextIO | None = None, enabled: bool = True):
        self.total = int(total or 0)
        self.label, self.unit, self.images_per_unit = label, unit, images_per_unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._last_draw = self.start
        self._drawn = False

    def line(self, done: int, extra: dict | None = None) -> str:
        """The text shown after ``done`` units (no line ending)."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done * self.images_per_unit / elapsed
        parts = [self.label]
        if self.total:
            filled = min(BAR_WIDTH, done * BAR_WIDTH // self.total)
            eta = (self.total - done) * elapsed / done if done else float("nan")
            parts += [f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}]",
                      f"{done}/{self.total} {self.unit}", f"{rate:.0f} img/s",
                      f"ETA {format_seconds(eta)}"]
        else:
            parts += [f"{done} {self.unit}", f"{rate:.0f} img/s"]
        for key, value in (extra or {}).items():
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        return "  ".join(parts)

    def update(self, done: int, **extra) -> None:
        """Report ``done`` units finished (and extra figures such as ``loss``)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw < REDRAW_S and done < self.total:
                return
            self.stream.write("\r\033[K" + self.line(done, extra))
            self._drawn = True
        else:
            finished = bool(self.total) and done >= self.total
            if not finished and now - self._last_draw < PLAIN_EVERY_S:
                return
            self.stream.write(self.line(done, extra) + "\n")
        self._last_draw = now
        self.stream.flush()

    def close(self) -> None:
        """End the display (a terminal bar is cleared, so the next line starts clean)."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
