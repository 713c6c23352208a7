"""Every command-line app loads together (no flag defined twice) and documents every flag."""

import importlib
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO, imported_modules

from pneumo_tf.core import cli

APPS = ["pneumo_tf.make_phantoms", "pneumo_tf.convert", "pneumo_tf.train",
        "pneumo_tf.evaluate", "pneumo_tf.gradcam", "pneumo_tf.compare", "pneumo_tf.export",
        "pneumo_tf.predict"]
# Commands whose flags may all be shared with the commands above (their key flags).
SHARING_APPS = ["pneumo_tf.calibrate", "pneumo_tf.ensemble", "pneumo_tf.ood"]


def test_all_apps_import_into_one_process_and_document_their_flags():
    for name in APPS:
        module = importlib.import_module(name)  # DuplicateFlagError if two apps share a name
        assert callable(module.run), f"{name} has no run() entry point"
        own = flags.FLAGS.get_flags_for_module(name)
        assert own, f"{name} defines no flags of its own"
        for flag in own:
            assert flag.help and len(flag.help) > 10, f"--{flag.name} of {name} has no real help"
    for name in SHARING_APPS:
        module = importlib.import_module(name)
        assert callable(module.run), f"{name} has no run() entry point"
        keys = flags.FLAGS.get_key_flags_for_module(name)
        assert {h.name for h in module.FLAG_HOLDERS.values()} <= {f.name for f in keys}
        for flag in keys:
            assert flag.help and len(flag.help) > 10, f"--{flag.name} of {name} has no real help"


TOOLS = ["make_phantoms", "make_tfrecords", "demo", "bench_convert", "bench_input",
         "bench_train", "bench_gradcam", "bench_predict", "bench_ood", "bench_optimizer"]


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_are_executable_scripts_with_help(tool):
    import os

    path = REPO / "tools" / tool
    assert path.read_text().startswith("#!/usr/bin/env python3")
    assert os.access(path, os.X_OK), f"tools/{tool} is not executable"
    proc = subprocess.run([sys.executable, "-X", "importtime", str(path), "--helpfull"],
                          capture_output=True, text=True, timeout=120)
    # absl prints the help and exits with status 1 by design; what matters is the flag text.
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"tools/{tool}" in proc.stdout or tool in proc.stdout
    # The help does not wait for TensorFlow: tools import it where they run a model.
    imported = imported_modules(proc.stderr)
    assert "tensorflow" not in imported and "keras" not in imported, tool


def test_run_split_flags_is_the_shared_flags_as_one_group():
    from pneumo_tf.core import cli

    group = cli.define_config_flags(cli.RunSplitFlags, module_name=__name__)
    assert [h.name for h in group.values()] == ["run_dir", "data_dir", "split", "batch_size",
                                                "seed"]
    assert group["split"].default == "test" and group["batch_size"].default == 32
    # a second app in the same process reuses the definitions
    again = cli.define_config_flags(cli.RunSplitFlags, module_name=__name__)
    assert [h.name for h in again.values()] == [h.name for h in group.values()]


def test_an_app_whose_reader_goes_away_stops_quietly():
    """``predict ... | head``: a closed stdout ends the app with status 1 and no error text."""
    code = ("from pneumo_tf.core import cli\n"
            "def main(argv):\n"
            "    for i in range(10**6):\n"
            "        print('row', i, flush=True)\n"
            "cli.run_app(main, 'pneumo_tf.fake')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "error" not in err.lower(), err


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_missing_required_flag_is_one_line_naming_the_flag_and_helpshort():
    proc = _command("-m", "pneumo_tf.evaluate", "--data_dir=somewhere")
    assert proc.returncode == 1
    assert proc.stderr == ("pneumo_tf.evaluate: error: --run_dir is required (--helpshort lists "
                           "the flags)\n")
    assert proc.stdout == ""  # not the module docstring


def test_helpshort_lists_the_commands_own_flags_one_line_each():
    import pneumo_tf.evaluate as evaluate

    proc = _command("-m", "pneumo_tf.evaluate", "--helpshort")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == evaluate.__doc__.splitlines()[0]
    assert "What it writes" not in proc.stdout  # the docstring's body stays in --helpfull
    assert any(line.strip().startswith("python -m pneumo_tf.evaluate --run_dir=R")
               for line in lines)
    flag_lines = [line for line in lines if line.startswith("  --")]
    names = [line.split()[0].split("=")[0].replace("[no]", "") for line in flag_lines]
    assert names == [f"--{name}" for name in evaluate.FLAG_HOLDERS]
    assert "  --split=test " in proc.stdout and "--num_resamples=2000" in proc.stdout
    assert max(len(line) for line in lines if line.startswith("  --")) <= cli.HELP_WIDTH
    # --help is the same short text
    assert _command("-m", "pneumo_tf.evaluate", "--help").stdout == proc.stdout


def test_short_help_takes_the_first_sentence_and_shortens_long_ones():
    group = cli.define_config_flags(cli.RunSplitFlags, module_name=__name__)
    doc = "Do a thing.\n\nUsage::\n\n    python -m x --run_dir=R \\\n        --split=val\n\nMore.\n"
    text = cli.short_help(doc, group, width=60)
    assert text.splitlines()[:4] == ["Do a thing.", "", "usage:",
                                     "  python -m x --run_dir=R --split=val"]
    seed = next(line for line in text.splitlines() if line.startswith("  --seed=0"))
    assert seed.endswith(" ...") and len(seed) <= 60


def test_error_types_named_by_string_resolve_only_once_imported():
    from pneumo_tf.core import rundir

    assert cli._error_types(["pneumo_tf.core.rundir.RunDirError", "no_such.module.Error",
                             KeyError]) == (rundir.RunDirError, KeyError)


@pytest.mark.slow
def test_a_benchmark_starts_as_quietly_as_the_commands(tmp_path):
    """TensorFlow's start-up lines (oneDNN, cuda drivers, cuInit) stay off a tool's stderr."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "PNEUMO_TF_TF_LOG_LEVEL_DEFAULTED",
                        "PNEUMO_TF_TF_BANNER")}  # the tests' own setting would ask for them
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_gradcam"), "--backbone=small_cnn",
         "--image_size=32", "--num_images=4", "--baseline_images=1", "--batch_size=4",
         "--precision=float32"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[0] for line in proc.stderr.splitlines()] == ["saved"], proc.stderr
    assert '"batched_float32"' in proc.stdout
    for tool in sorted((REPO / "tools").glob("bench_*")):
        text = tool.read_text(encoding="utf-8")
        assert "TF_CPP_MIN_LOG_LEVEL" not in text and "cli.run_app(main" in text, tool.name
