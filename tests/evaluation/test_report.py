"""The evaluation report's documents: report.md and report.html say the same, rendered."""

from __future__ import annotations

import re

import numpy as np

from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.evaluation import report


def _metrics() -> dict:
    rng = np.random.default_rng(0)
    labels = (rng.random(80) < 0.6).astype(int)
    probs = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 80), 0.001, 0.999)
    info = {"value": 0.5, "method": "val_youden", "source": "val", "applies_to": "probability"}
    metrics = pmetrics.binary_report(labels, probs, 0.5, info, num_resamples=1000, seed=0)
    metrics.update(split="test", calibration="val", evaluation="test",
                   ood={"skipped": "the run has no ood.json; fit it with `python -m "
                                   "pneumo_tf.ood --run_dir=<R>`"})
    return metrics


CONTEXT = {"split": "test", "run_dir": "runs/a", "data_dir": "data/<site>", "temperature": 1.2}


def test_html_renders_the_markdown_tables_bold_and_code(tmp_path):
    metrics = _metrics()
    report.write_markdown(tmp_path / "report.md", metrics, {}, CONTEXT)
    report.write_html(tmp_path / "report.html", metrics, {"roc": b"\x89PNG"}, CONTEXT)
    md = (tmp_path / "report.md").read_text()
    doc = (tmp_path / "report.html").read_text()
    # One HTML table per markdown table, each with its rows; none empty.
    md_tables = len(re.findall(r"^\|---", md, re.M))
    assert md_tables >= 1 and doc.count("<table>") == md_tables
    assert "<table></table>" not in re.sub(r"\s+", "", doc)
    rows = len(re.findall(r"^\| (?!metric)", md, re.M))
    assert doc.count("<tr>") == rows + md_tables  # body rows + one header row per table
    assert "<strong>split evaluated: <code>test</code></strong>" in doc
    assert "<code>runs/a</code>" in doc and "<code>data/&lt;site&gt;</code>" in doc
    assert "<h2>Out of distribution</h2>" in doc
    assert "<code>python -m pneumo_tf.ood --run_dir=&lt;R&gt;</code>" in doc
    text = re.sub(r"<[^>]+>", "", doc.split("<body>")[1])
    assert "**" not in text and "`" not in text and "|---" not in text
    assert doc.count("data:image/png;base64,") == 1


def test_markdown_to_html_shows_raw_html_as_text():
    out = report.markdown_to_html("pass --data_dir=<the site's data dir> & <b>x</b>")
    assert out == "<p>pass --data_dir=&lt;the site's data dir&gt; &amp; &lt;b&gt;x&lt;/b&gt;</p>"
