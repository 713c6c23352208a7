"""The layout rule: commands at the top of pneumo_tf/, one library folder per stage, arrows down.

- every module directly in ``pneumo_tf/`` (but ``__init__``) is a command: an absl app with a
  ``main`` and a ``run``, at most :data:`MAX_COMMAND_LINES` lines;
- no library module (anything in a folder) defines flags when imported;
- no library module imports a command;
- no import circle, counting imports inside functions (a lazy import is still an arrow).

The one exception: a library module's ``if __name__ == "__main__":`` block may start a command
(the old spellings ``python -m pneumo_tf.data.convert`` / ``...data.phantoms`` keep working);
that block runs only as a program, never when the module is imported.
"""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "pneumo_tf"
MAX_COMMAND_LINES = 250
COMMANDS = ("train", "evaluate", "calibrate", "gradcam", "compare", "ensemble", "export",
            "predict", "ood", "convert", "make_phantoms")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def _imported(tree: ast.Module, modules: dict) -> set[str]:
    """The pneumo_tf modules ``tree`` imports anywhere (also inside functions)."""
    skip = {id(n) for top in tree.body if _is_main_block(top) for n in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pneumo_tf."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumo_tf"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
            for name, path in modules.items()}


def _is_command(name: str) -> bool:
    return name.count(".") == 1


def test_every_top_level_module_is_a_short_command():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == sorted(COMMANDS), f"top-level modules that are not the commands: {top}"
    for name in top:
        path = PACKAGE / f"{name}.py"
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_COMMAND_LINES, f"{path.name}: {lines} lines > {MAX_COMMAND_LINES}"
        defined = {n.name for n in ast.parse(path.read_text()).body
                   if isinstance(n, ast.FunctionDef)}
        assert {"main", "run"} <= defined, f"{path.name} has no main() and run()"


def test_no_library_module_imports_a_command():
    offenders = [f"{lib} -> {dep}" for lib, deps in _graph().items() if not _is_command(lib)
                 for dep in deps if _is_command(dep)]
    assert not offenders, f"libraries importing commands: {offenders}"


def test_no_import_circle_counting_imports_inside_functions():
    graph = _graph()
    circles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep in on_stack:
                circles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, stack, on_stack, done)
        on_stack.discard(stack.pop())
        done.add(node)

    done: set = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [], set(), done)
    assert not circles, f"import circles: {circles}"


def test_no_library_module_defines_flags_when_imported():
    libraries = sorted(n for n in _modules() if not _is_command(n) and n != "pneumo_tf")
    code = ("import importlib, sys\nfrom absl import flags\n"
            "before = set(flags.FLAGS)\n"
            f"for name in {libraries!r}:\n"
            "    importlib.import_module(name)\n"
            "    new = {f for f in set(flags.FLAGS) - before\n"
            "           if 'pneumo_tf' in flags.FLAGS.find_module_defining_flag(f, '')}\n"
            "    if new:\n"
            "        sys.exit(f'{name} defines flags {sorted(new)}')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
