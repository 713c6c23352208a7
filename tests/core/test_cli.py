"""Every command-line app loads together (no flag defined twice) and documents every flag."""

import importlib
import subprocess
import sys

import pytest
from absl import flags

from conftest import REPO

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
         "bench_train", "bench_gradcam", "bench_predict", "bench_ood"]


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_are_executable_scripts_with_help(tool):
    import os

    path = REPO / "tools" / tool
    assert path.read_text().startswith("#!/usr/bin/env python3")
    assert os.access(path, os.X_OK), f"tools/{tool} is not executable"
    proc = subprocess.run([sys.executable, str(path), "--helpfull"], capture_output=True,
                          text=True, timeout=120)
    # absl prints the help and exits with status 1 by design; what matters is the flag text.
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"tools/{tool}" in proc.stdout or tool in proc.stdout


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
