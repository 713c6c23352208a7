"""The run directory: reading what a training run left behind."""

from __future__ import annotations

from pneumo_tf import rundir


def test_parse_flags_text_reads_values_booleans_and_skips_comments():
    text = ("# python -m pneumo_tf.train --flagfile=THIS_FILE  (written by pneumo_tf.train)\n"
            "--data_dir=/data/kermany\n"
            "\n"
            "--lr=0.001\n"
            "--augment\n"
            "--noflip\n"
            "  --backbone=resnet50  \n"
            "--name=a=b\n"
            "--empty=\n"
            "not a flag\n"
            "--lr=0.002\n")
    assert rundir.parse_flags_text(text) == {
        "data_dir": "/data/kermany", "lr": "0.002", "augment": "true", "flip": "false",
        "backbone": "resnet50", "name": "a=b", "empty": ""}


def test_read_run_flags(tmp_path):
    assert rundir.read_run_flags(tmp_path) == {}
    (tmp_path / "flags.txt").write_text("# comment\n--data_dir=D\n--nocalibrate\n",
                                        encoding="utf-8")
    assert rundir.read_run_flags(tmp_path) == {"data_dir": "D", "calibrate": "false"}
