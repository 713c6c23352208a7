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
