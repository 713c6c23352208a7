"""Tests of pneumo_tf.core.progress: the bar on a terminal, plain lines in logs."""

import io
import re

from pneumo_tf.core import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_format_seconds():
    assert progress.format_seconds(75.2) == "1:15"
    assert progress.format_seconds(3725) == "1:02:05"
    assert progress.format_seconds(float("nan")) == "?"


def test_line_has_count_rate_eta_and_extras():
    bar = progress.Progress(200, "epoch 3", unit="step", images_per_unit=32, stream=io.StringIO())
    bar.start -= 10.0  # 10 s in
    text = bar.line(50, {"loss": 0.21})
    assert text.startswith("epoch 3  [######                  ]  50/200 step")
    assert "160 img/s" in text and "ETA 0:30" in text and "loss 0.2100" in text


def test_plain_stream_writes_few_full_lines(monkeypatch):
    out = io.StringIO()
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress(100, "val", stream=out)
    for done in range(1, 101):
        clock[0] += 1.0  # one unit a second: 100 s in all
        bar.update(done)
    bar.close()
    lines = out.getvalue().splitlines()
    # Every 30 s and at the end; no carriage returns in a log.
    assert [re.search(r"\d+/100", line)[0] for line in lines] == [
        "30/100", "60/100", "90/100", "100/100"]
    assert "\r" not in out.getvalue()


def test_terminal_redraws_in_place_and_clears(monkeypatch):
    out = _Tty()
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress(10, "predict", stream=out)
    for done in range(1, 11):
        clock[0] += 0.5
        bar.update(done)
    bar.close()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 11 and text.endswith("\r\033[K")
    assert "10/10 img" in text


def test_disabled_writes_nothing():
    out = io.StringIO()
    bar = progress.Progress(5, "x", stream=out, enabled=False)
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""


def test_no_rate_or_eta_until_a_rate_is_known(monkeypatch):
    """The converter's first line once read ``1/5216 2 img/s ETA 3080 s``: one image after the
    worker pool's start-up says nothing about the rate."""
    out = _Tty()
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress(5216, "convert", stream=out)
    clock[0] = 0.5  # start-up, then the first image
    bar.update(1)
    first = out.getvalue()
    assert first.endswith("1/5216 img") and "img/s" not in first and "ETA" not in first
    clock[0] = 1.0
    assert bar.line(200).endswith("200/5216 img")  # 0.5 s of work: still no rate
    clock[0] = 2.5  # 2 s after the first image: 800 more
    text = bar.line(801)
    assert text.endswith("801/5216 img  400 img/s  ETA 0:11"), text  # 4415 left at 400/s


def test_a_finished_display_shows_the_average_rate_and_no_eta(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress(10, "val", stream=io.StringIO())
    clock[0] = 0.2
    bar.update(10)
    assert bar.line(10).endswith("10/10 img  50 img/s")
