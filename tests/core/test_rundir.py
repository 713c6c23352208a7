"""The run directory: reading what a training run left behind."""

from __future__ import annotations

import pytest

from pneumo_tf.core import rundir


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


def _write(path, obj):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_named_calibrations_live_beside_calibration_json(tmp_path):
    import pytest

    run = tmp_path / "run"
    paths = rundir.RunPaths(run)
    assert paths.calibration_file("val") == run / "calibration.json"
    assert paths.calibration_file("site_b") == run / "calibrations" / "site_b.json"
    assert paths.export_dir("val") == run / "export"
    assert paths.export_dir("site_b") == run / "export_site_b"
    # An old run without calibrations/: val reads as before, a named one is refused by name.
    assert rundir.list_calibrations(run) == []
    assert rundir.read_named_calibration(run, "val") is None
    with pytest.raises(rundir.RunDirError, match=r"--calibration=site_b: .*site_b.json is missing "
                                                 r"\(this run has: none\).*pneumo_tf.calibrate"):
        rundir.read_named_calibration(run, "site_b")
    _write(paths.calibration, {"temperature": 1.0, "threshold": 0.5})
    _write(paths.calibration_file("site_b"), {"temperature": 2.0, "threshold": 0.4})
    _write(paths.calibration_file("a"), {"temperature": 3.0, "threshold": 0.3})
    assert rundir.list_calibrations(run) == ["val", "a", "site_b"]
    assert rundir.read_named_calibration(run)["temperature"] == 1.0
    assert rundir.read_named_calibration(run, "site_b")["temperature"] == 2.0
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(ValueError, match="calibration name"):
            paths.calibration_file(bad)


def test_run_data_dir_and_is_run_data(tmp_path):
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", counts={"val": (1, 1)})
    other = write_tiny_dataset(tmp_path / "other", counts={"val": (1, 1)}, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    assert rundir.run_data_dir(run) is None
    (run / "flags.txt").write_text(f"--data_dir={tmp_path / 'gone'}\n", encoding="utf-8")
    assert rundir.run_data_dir(run) == str(tmp_path / "gone")
    _write(run / "summary.json", {"config": {"data_dir": str(data)}})
    assert rundir.run_data_dir(run) == str(data)  # summary.json before flags.txt
    (run / "data_manifest.json").write_bytes((data / "manifest.json").read_bytes())
    assert rundir.is_run_data(run, data)
    moved = tmp_path / "moved"
    data.rename(moved)
    assert rundir.is_run_data(run, moved)  # same manifest: the run's data, moved
    assert not rundir.is_run_data(run, other)
    assert rundir.is_same_data(moved, moved) and not rundir.is_same_data(moved, other)


def test_evaluation_names_keep_every_evaluation_apart(tmp_path):
    """eval/ and gradcam/ folders and TensorBoard tag prefixes: one name per evaluation."""
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", counts={"val": (1, 1)})
    site = write_tiny_dataset(tmp_path / "site_b", counts={"test": (1, 1)}, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_manifest.json").write_bytes((data / "manifest.json").read_bytes())
    names = [rundir.evaluation_name(run, data, "test"),
             rundir.evaluation_name(run, None, "val"),
             rundir.evaluation_name(run, site, "test"),
             rundir.evaluation_name(run, site, "test", "site_b"),
             rundir.evaluation_name(run, data, "test", threshold_method="val_youden"),
             rundir.evaluation_name(run, site, "test", threshold_method="0.5")]
    assert names == ["test", "val", "test-site_b", "test-site_b-cal_site_b", "test@val_youden",
                     "test-site_b@0.5"]
    assert rundir.evaluation_dir(run, site, "test") == run / "eval" / "test-site_b"
    assert rundir.gradcam_dir(run, data, "val") == run / "gradcam"
    assert rundir.gradcam_dir(run, site, "test") == run / "gradcam" / "test-site_b"
    assert rundir.gradcam_dir(run, data, "test", "site_b") == run / "gradcam" / "test-cal_site_b"


def test_every_file_a_run_writes_is_a_run_entry():
    """A lungs run's guard counts as a run's own file (train refuses folders of other files)."""
    for name in ("flags.txt", rundir.OOD_JSON, rundir.LUNG_GUARD_NAME, "export_site_b", "eval"):
        assert rundir.is_run_entry(name), name
    assert not rundir.is_run_entry("notes.txt")


def test_a_run_file_being_written_is_a_run_entry(tmp_path):
    """A multi-worker run's chief writes data_manifest.json.partial while the other worker checks
    the folder: that worker must not refuse it (seen in the two-worker test under load)."""
    from pneumo_tf.core import atomic_files
    from pneumo_tf.training import resume
    from pneumo_tf.training.config import TrainError

    paths = rundir.RunPaths(tmp_path / "run")
    for name in ("data_manifest.json", "model.keras", "flags.txt"):
        for keep_suffix in (False, True):
            partial = atomic_files.partial_path(paths.root / name, keep_suffix).name
            assert rundir.is_run_entry(partial), partial
    assert not rundir.is_run_entry("notes.txt.partial")
    paths.root.mkdir()
    (paths.root / "data_manifest.json.partial").write_text("{")
    resume.check_run_dir(paths)  # a run being started: no error
    (paths.root / "data_manifest.json.partial").rename(paths.root / "notes.txt.partial")
    with pytest.raises(TrainError, match=r"is not a run directory: it holds .*notes.txt.partial"):
        resume.check_run_dir(paths)
