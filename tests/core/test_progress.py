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
