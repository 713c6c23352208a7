"""Progress on stderr for long loops: a live bar on a terminal, plain periodic lines elsewhere.

``Progress(total, "epoch 3", unit="step", images_per_unit=32)`` then ``update(done, loss=0.21)``
after each step, and ``close()``. On a terminal the bar is redrawn in place at most five times a
second (``epoch 3 [#########     ] 120/260 step  312 img/s  ETA 0:45  loss 0.2100``); when stderr
is not a terminal (CI logs, ``nohup``) a full line is written every :data:`PLAIN_EVERY_S` seconds
and when the work is done, so a log shows the run is alive without filling up.

The rate (and the ETA from it) is measured from the first ``update``, so start-up (worker pools,
the first step's tracing) does not count, and shown only once :data:`RATE_MIN_S` seconds of work
have been timed: until then the line shows the count alone (no ``2 img/s  ETA 51:20`` guessed
from one image). A finished display shows the average rate.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
REDRAW_S = 0.2
PLAIN_EVERY_S = 30.0
RATE_MIN_S = 1.0  # seconds of timed work before a rate (and an ETA) is shown


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
        self._reference: tuple[float, int] | None = None  # (time, done) of the first update

    def units_per_second(self, done: int, now: float | None = None) -> float | None:
        """Units per second since the first update (since the start before one), or None while
        less than :data:`RATE_MIN_S` of work is timed; the average over the whole display once
        ``done`` reaches ``total``."""
        now = time.monotonic() if now is None else now
        since, done_then = self._reference or (self.start, 0)
        if now - since >= RATE_MIN_S and done > done_then:
            return (done - done_then) / (now - since)
        if self.total and done >= self.total and now > self.start:
            return done / (now - self.start)
        return None

    def line(self, done: int, extra: dict | None = None) -> str:
        """The text shown after ``done`` units (no line ending)."""
        rate = self.units_per_second(done)
        speed = [] if rate is None else [f"{rate * self.images_per_unit:.0f} img/s"]
        parts = [self.label]
        if self.total:
            filled = min(BAR_WIDTH, done * BAR_WIDTH // self.total)
            parts += [f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}]",
                      f"{done}/{self.total} {self.unit}"] + speed
            if rate is not None and done < self.total:
                parts.append(f"ETA {format_seconds((self.total - done) / rate)}")
        else:
            parts += [f"{done} {self.unit}"] + speed
        for key, value in (extra or {}).items():
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        return "  ".join(parts)

    def update(self, done: int, **extra) -> None:
        """Report ``done`` units finished (and extra figures such as ``loss``)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._reference is None:
            self._reference = (now, done)
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
