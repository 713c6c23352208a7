"""The suite's own scheduling: the tests that share an expensive module fixture run on one
xdist worker, so the fixture is built once (``ONE_WORKER_FIXTURES`` in ``tests/conftest.py``)."""

import ast
from pathlib import Path

import pytest

from conftest import ONE_WORKER_FIXTURES, REPO


def _group(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark else None


def test_the_tests_of_each_expensive_module_fixture_share_one_group(request):
    items = [item for item in request.session.items if item.path.is_relative_to(REPO)]
    modules = {item.path.relative_to(REPO).as_posix() for item in items}
    if not modules & set(ONE_WORKER_FIXTURES):
        pytest.skip("none of the modules with a grouped fixture was collected")
    # Under `--dist loadgroup` xdist appends the group to each grouped test's node id, and its
    # scheduler sends each group to one worker. pytest 9.2 with pytest-xdist 3.8 drops that
    # suffix without a word (setup.cfg pins pytest below 9.2): the grouping would be lost.
    grouping = getattr(request.config.option, "loadgroup", False)
    users = {}
    for item in items:
        module = item.path.relative_to(REPO).as_posix()
        names = [n for n in ONE_WORKER_FIXTURES.get(module, ()) if n in item.fixturenames]
        if names:
            group = f"{Path(module).stem}.{names[0]}"
            assert _group(item) == group, item.nodeid
            if grouping:
                assert item.nodeid.endswith(f"@{group}"), item.nodeid
            users.setdefault(module, []).append(item.name)
        else:
            assert _group(item) is None, item.nodeid
    for module in users:
        # A fixture that only one test uses needs no group: the table would be stale.
        assert len(users[module]) >= 2, (module, users[module])


def test_every_grouped_fixture_exists_and_is_module_scoped():
    for module, names in ONE_WORKER_FIXTURES.items():
        tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
        scopes = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.fixture":
                        scopes[node.name] = {k.arg: ast.literal_eval(k.value)
                                             for k in deco.keywords}.get("scope")
        for name in names:
            assert scopes.get(name) == "module", (module, name, scopes)


class _Item:
    """What the hook reads and writes of a pytest item."""

    def __init__(self, path, fixturenames):
        self.path, self.fixturenames, self.marks = path, fixturenames, []

    def add_marker(self, mark):
        self.marks.append(mark)


def test_the_hook_groups_by_module_and_fixture_only():
    import conftest

    ensemble = REPO / "tests" / "evaluation" / "test_ensemble.py"
    items = [_Item(ensemble, ["ensemble_run", "tmp_path"]), _Item(ensemble, ["tmp_path"]),
             _Item(REPO / "tests" / "explain" / "test_cam.py", ["ensemble_run"]),
             _Item(REPO.parent / "elsewhere" / "test_x.py", ["ensemble_run"])]
    conftest.pytest_collection_modifyitems(None, items)
    assert [(m.name, m.args) for m in items[0].marks] == [
        ("xdist_group", ("test_ensemble.ensemble_run",))]
    assert [item.marks for item in items[1:]] == [[], [], []]
