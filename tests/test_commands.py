"""Every command lists its own flags under ``python -m`` (one subprocess per command)."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

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
