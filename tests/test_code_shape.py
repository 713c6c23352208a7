"""The code stays readable: short functions, few parameters, no flags in library modules."""

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

MAX_LINES = 80
MAX_PARAMS = 10
# The command-line apps (every module directly in pneumo_tf/) and the flag machinery: the only
# modules that may define absl flags.
APPS = {str(p.relative_to(REPO)) for p in (REPO / "pneumo_tf").glob("*.py")} | {
    "pneumo_tf/core/cli.py"}


def _functions():
    for path in sorted((REPO / "pneumo_tf").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node


def _param_count(fn: ast.FunctionDef) -> int:
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + bool(args.vararg) + bool(args.kwarg)


def test_no_function_is_longer_than_80_lines_or_takes_more_than_10_parameters():
    too_long, too_many = [], []
    for path, fn in _functions():
        lines = fn.end_lineno - fn.lineno + 1
        if lines > MAX_LINES:
            too_long.append(f"{path}:{fn.lineno} {fn.name} ({lines} lines)")
        if _param_count(fn) > MAX_PARAMS:
            too_many.append(f"{path}:{fn.lineno} {fn.name} ({_param_count(fn)} parameters)")
    assert not too_long, "functions over 80 lines: " + "; ".join(too_long)
    assert not too_many, "functions over 10 parameters: " + "; ".join(too_many)


def test_every_tf_function_is_traced_without_autograph():
    # AutoGraph rewrites a function's source before tracing it: 40 % of the time of tracing an
    # export's signatures. The package's graph code branches with tf.cond and tf.where instead.
    def is_tf_function(node):
        return (isinstance(node, ast.Attribute) and node.attr == "function"
                and isinstance(node.value, ast.Name) and node.value.id == "tf")

    uses, without_autograph = set(), set()
    for path in sorted((REPO / "pneumo_tf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if is_tf_function(node):
                uses.add(where)
            elif isinstance(node, ast.Call) and is_tf_function(node.func) and any(
                    k.arg == "autograph" and getattr(k.value, "value", None) is False
                    for k in node.keywords):
                without_autograph.add(where)
    assert len(uses) >= 10  # the scoring, training, Grad-CAM and serving functions
    missing = sorted(uses - without_autograph)
    assert not missing, f"tf.function without autograph=False: {missing}"


def test_only_the_apps_define_flags():
    offenders = []
    for path in sorted((REPO / "pneumo_tf").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel in APPS:
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"flags\.DEFINE_|define_config_flags\(", text):
            offenders.append(rel)
    assert not offenders, f"library modules defining flags: {offenders}"


def test_docs_and_code_stand_on_their_own():
    """Nothing points users at a specification file they do not have."""
    found = subprocess.run(["grep", "-rnwE", r"SPEC(\.md)?", "README.md", "BUILD.md", "configs",
                            "pneumo_tf", "tools"], cwd=REPO, capture_output=True, text=True)
    assert found.stdout == "", found.stdout


@pytest.mark.parametrize("app,absent", [
    ("tools/make_tfrecords", ("run_dir", "split")),
    ("-m pneumo_tf.train", ("src", "out", "split")),
    ("-m pneumo_tf.predict", ("formats", "parity_count")),
])
def test_each_app_lists_only_its_own_flags(app, absent):
    proc = subprocess.run([sys.executable, *app.split(), "--helpfull"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", proc.stdout, re.M))
    assert listed, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not listed & set(absent), f"{app} --helpfull lists {sorted(listed & set(absent))}"
