"""Which --run_dir training accepts: new, empty or a run's folder; never a file or foreign files."""

import pytest

from conftest import run_command, write_tiny_dataset

from pneumo_tf.core import rundir
from pneumo_tf.training import resume
from pneumo_tf.training.config import TrainError


def test_a_new_an_empty_and_a_runs_folder_are_accepted(tmp_path):
    resume.check_run_dir(rundir.RunPaths(tmp_path / "new" / "run"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")  # hidden files are nobody's
    resume.check_run_dir(rundir.RunPaths(tmp_path / "empty"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "flags.txt").write_text("--epochs=3\n")
    (run / "notes.txt").write_text("a run with the user's notes beside it")
    resume.check_run_dir(rundir.RunPaths(run))


def test_a_folder_of_other_files_is_refused_naming_one(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(TrainError) as e:
        resume.check_run_dir(rundir.RunPaths(tmp_path))
    assert str(e.value) == (f"--run_dir={tmp_path} is not a run directory: it holds "
                            f"{tmp_path / 'notes.txt'} and no run's files (flags.txt, "
                            f"data_manifest.json, backup/, ...); pass a new or empty folder")
    (tmp_path / "best").mkdir()  # e.g. the parent folder of several runs
    with pytest.raises(TrainError, match=rf"holds {tmp_path / 'best'} and 1 other file"):
        resume.check_run_dir(rundir.RunPaths(tmp_path))


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(TrainError, match=r"run is a file, not a folder; pass a new folder"):
        resume.check_run_dir(rundir.RunPaths(tmp_path / "run"))
    with pytest.raises(TrainError, match=rf"is under {tmp_path / 'run'}, which is a file"):
        resume.check_run_dir(rundir.RunPaths(tmp_path / "run" / "sub"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "notes"])
def test_train_refuses_such_a_run_dir_in_one_line(tmp_path, kind):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    if kind == "file":
        run.write_text("")
        want = f"--run_dir={run} is a file, not a folder"
    else:
        run.mkdir()
        (run / "notes.txt").write_text("")
        want = f"--run_dir={run} is not a run directory: it holds {run / 'notes.txt'}"
    done = run_command("pneumo_tf.train", f"--data_dir={data}", f"--run_dir={run}",
                      "--backbone=small_cnn", "--weights=none", "--epochs=1")
    assert done.returncode == 1
    # (The tests' TF_CPP_MIN_LOG_LEVEL lets TensorFlow's start-up lines through: the last counts.)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pneumo_tf.train: error: {want}"), done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]
    assert kind == "file" or [p.name for p in run.iterdir()] == ["notes.txt"]
