"""Every command README.md and BUILD.md show runs as written (inside the project's environment).

The documents say to enter the environment first (``source .venv/bin/activate``); here that is
the interpreter running the tests, whose folder goes first on PATH. Each distinct program a
document shows is run with ``--help``: it must start, know its flags and exit cleanly.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = ("README.md", "BUILD.md")
# How a documented command line starts -> the words that name the program.
PROGRAM_RE = re.compile(r"^(python -m [\w.]+|tools/\w+|pneumo-[\w-]+|make \w+|tensorboard)\b")


def documented_commands() -> list[tuple[str, str]]:
    """``(document, command line)`` for every line of a shell block in the documents."""
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append((doc, line.split(" #")[0].strip()))
    return found


def programs() -> list[str]:
    """The distinct programs the documents run (``python -m pneumo_tf.train``, ...)."""
    seen = []
    for _, line in documented_commands():
        m = PROGRAM_RE.match(line)
        if m and m[1] not in seen:
            seen.append(m[1])
    return seen


def test_the_documents_show_commands_and_say_how_to_enter_the_environment():
    assert len(programs()) >= 10, programs()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "source .venv/bin/activate" in readme


def test_every_documented_line_starts_with_a_known_program():
    allowed = re.compile(r"^(source |cd |cp |ls |cat |\$?PYTEST|export |pip |\.venv/)")
    unknown = [(doc, line) for doc, line in documented_commands()
               if not PROGRAM_RE.match(line) and not allowed.match(line)]
    assert not unknown, unknown


@pytest.mark.parametrize("program", programs())
def test_each_documented_program_runs_with_help(program):
    if program.startswith("make "):
        pytest.skip("make targets run the whole demo or suite; CI runs `make test` itself")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    argv = shlex.split(program)
    if argv[0] == "python":
        argv[0] = sys.executable
    proc = subprocess.run([*argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # absl prints usage and exits 0 (--help) or 1 (--helpfull on some versions).
    assert proc.returncode in (0, 1), (proc.returncode, proc.stderr[-2000:])
    assert "flags" in (proc.stdout + proc.stderr).lower() or "usage" in \
        (proc.stdout + proc.stderr).lower()


def test_build_md_says_what_make_venv_installs():
    """BUILD.md's `make venv` line names the extras the Makefile installs."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    installed = re.search(r"pip install --quiet -e '(\.\[[\w,]+\])'", makefile)
    assert installed, "the Makefile's venv recipe changed: update this test and BUILD.md"
    build = (REPO / "BUILD.md").read_text(encoding="utf-8")
    documented = next(line for line in build.splitlines() if line.startswith("make venv"))
    assert f"pip install -e '{installed[1]}'" in documented, documented


def _shipped_data_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The data shipped with the project"):]
    section = section[:section.index("\n## ", 1)]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_shipped_data_commands_use_the_splits_the_data_has():
    """chest_xray/ has only train (val is carved from it): its data dir is evaluated on val;
    the external sample has only test; the lung masks mirror chest_xray/train."""
    lines = _shipped_data_lines()
    sources = [re.search(r"--src=(\S+)", line)[1] for line in lines if "--src=" in line]
    assert sources == ["../shared/data/chest_xray/train", "../shared/data/chest_xray",
                       "../shared/data/chest_xray_external_dev"]
    masks = [re.search(r"--masks=(\S+)", line)[1] for line in lines if "--masks=" in line]
    assert masks == ["../shared/data/lung_masks/train"]
    splits = {re.search(r"--data_dir=(\S+)", line)[1]: re.search(r"--split=(\w+)", line)[1]
              for line in lines if "--split=" in line}
    assert splits == {"out/data/cxr128": "val", "out/data/ext128": "test"}


@pytest.mark.slow
def test_the_shipped_data_commands_parse_as_written():
    """Every line's flags parse (absl --only_check_args: unknown flags and bad values fail)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                                f"{os.environ.get('PATH', '')}")
    for line in _shipped_data_lines():
        argv = shlex.split(line)
        if argv[0] == "python":
            argv[0] = sys.executable
        proc = subprocess.run([*argv, "--only_check_args"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
