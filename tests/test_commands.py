"""Every command lists its own flags under ``python -m`` (one subprocess per command)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO, imported_modules

# A flag each command must list in its --helpfull (its own, not a shared one).
OWN_FLAG = {
    "train": "epochs", "evaluate": "split", "calibrate": "name", "gradcam": "num_images",
    "export": "formats", "predict": "model", "compare": "runs", "ensemble": "runs",
    "ood": "run_dir", "convert": "max_pixels", "make_phantoms": "num_train",
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(OWN_FLAG))
def test_python_m_helpfull_lists_the_commands_own_flags(command):
    proc = subprocess.run([sys.executable, "-m", f"pneumo_tf.{command}", "--helpfull"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # Under python -m, absl files the command's flags under the module's path (sys.argv[0]).
    sections = re.split(r"^(\S.*):$", proc.stdout, flags=re.M)
    own = next((body for head, body in zip(sections[1::2], sections[2::2])
                if head.endswith(f"pneumo_tf/{command}.py")), "")
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", own, re.M))
    assert OWN_FLAG[command] in listed, f"{command}: {sorted(listed)}\n{proc.stdout[-3000:]}"


# A typo of a flag each command has -> the flag absl suggests.
TYPO = {"train": ("epoch", "epochs"), "evaluate": ("splits", "split"),
        "calibrate": ("names", "name"), "gradcam": ("num_image", "num_images"),
        "export": ("format", "formats"), "predict": ("models", "model"),
        "compare": ("run", "runs"), "ensemble": ("run", "runs"), "ood": ("run_dirs", "run_dir"),
        "convert": ("max_pixel", "max_pixels"), "make_phantoms": ("num_trains", "num_train")}


@pytest.mark.parametrize("command", sorted(TYPO))
def test_a_flag_typo_is_answered_before_tensorflow_is_imported(command):
    """Flags are parsed first: a typo names the flag it meant, and TensorFlow never loaded
    (train's flags are the fields of ``training/config.py``'s ``TrainConfig``, a module that
    loads no TensorFlow)."""
    typo, meant = TYPO[command]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", f"pneumo_tf.{command}",
                           f"--{typo}=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    meant_line = re.search(rf"Unknown command line flag '{typo}'\. Did you mean: (.*) \?",
                           proc.stderr)
    assert meant_line and meant in meant_line[1].split(", "), proc.stderr[-2000:]
    imported = imported_modules(proc.stderr)
    assert "tensorflow" not in imported and "keras" not in imported
    assert "sklearn" not in imported and "matplotlib" not in imported


def test_train_names_the_flag_a_typo_meant():
    proc = subprocess.run([sys.executable, "-m", "pneumo_tf.train", "--epoch=3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Unknown command line flag 'epoch'. Did you mean: epochs ?" in proc.stderr
    assert "Traceback" not in proc.stderr
