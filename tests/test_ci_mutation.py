"""ci/mutation's own parts: the mutated line of a diff, the annotations it skips, the
reviewed verdicts it applies."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    loader = importlib.machinery.SourceFileLoader("ci_mutation", str(ROOT / "ci" / "mutation"))
    spec = importlib.util.spec_from_loader("ci_mutation", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


mutation = _script()

DIFF = """--- mutation diff ---
--- a/kit/ledger.py
+++ b/kit/ledger.py
@@ -20,7 +20,7 @@
 from typing import Any
 
 SCHEMA_VERSION = 1
-MAX_EVENT = 1 << 20
+MAX_EVENT = 2 << 20
 
 ROLES = ()
"""


def test_the_mutated_line_and_its_number_come_from_the_diff():
    assert mutation.mutated_line(DIFF) == (23, "MAX_EVENT = 2 << 20")
    assert mutation.mutated_line("") == (None, "")


def test_annotations_are_found_only_where_they_are_never_evaluated():
    source = (
        "from __future__ import annotations\n"
        "x: int | None = None\n"
        "def f(a: str | bytes, *, b: int = 1) -> dict | None:\n"
        "    return a | b\n"
    )
    spans = mutation.annotation_spans(source)
    assert ((2, 3), (2, 13)) in spans and ((3, 9), (3, 20)) in spans
    assert ((3, 28), (3, 31)) in spans and ((3, 40), (3, 51)) in spans
    assert not any(a <= (4, 11) < b for a, b in spans)  # the body's "|" is mutated
    assert mutation.annotation_spans(source.split("\n", 1)[1]) == []


def test_a_survivor_gets_its_reviewed_verdict_or_unreviewed():
    reviewed = [
        {"file": "kit/x.py", "operator": "op", "mutation": "a = 1", "reason": "why"},
        {
            "file": "kit/x.py",
            "operator": "op",
            "mutation": "b = 1",
            "killed_by": "tests/t.py::test",
        },
    ]
    survivor = {"file": "kit/x.py", "line": 3, "operator": "op", "mutation": "a = 1"}
    assert mutation.reviewed(reviewed, survivor) == {"reason": "why"}
    assert mutation.reviewed(reviewed, {**survivor, "mutation": "b = 1"}) == {
        "killed_by": "tests/t.py::test"
    }
    assert mutation.reviewed(reviewed, {**survivor, "operator": "other"}) == {
        "reason": "unreviewed"
    }


def test_every_module_has_tests_that_exist_and_the_reviewed_list_is_well_formed():
    for module, tests in mutation.TESTS.items():
        assert (ROOT / module).is_file(), module
        for t in tests:  # a file, or one test of it (path::name)
            path, _, name = t.partition("::")
            assert (ROOT / path).is_file(), t
            assert not name or f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), t
    import json

    for entry in json.loads(mutation.EQUIVALENT.read_text()):
        # each survivor either has the reason it is equivalent or names the test that kills it
        verdict = {"reason", "killed_by"} & set(entry)
        assert len(verdict) == 1 and set(entry) == {"file", "operator", "mutation", *verdict}
        assert (ROOT / entry["file"]).is_file() and entry[verdict.pop()]
        if "killed_by" in entry:
            path, test = entry["killed_by"].split(" ")[0].split("::")
            assert f"def {test.split('[')[0]}(" in (ROOT / path).read_text(), entry


SCOPED = '''
def outer():
    def inner():
        return 1
    return inner


class Box:
    @staticmethod
    def check(x):
        return x > 0

    def other(self):
        return 2
'''


def test_a_scoped_run_keeps_the_named_functions_with_their_decorators():
    assert mutation.function_spans(SCOPED, ["outer"]) == [(2, 5)]
    assert mutation.function_spans(SCOPED, ["Box.check"]) == [(9, 11)]
    assert mutation.function_spans(SCOPED, ["inner", "other"]) == [(3, 4), (13, 14)]


def test_a_scope_naming_a_missing_function_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"no function Box\.gone, nothing in the module"):
        mutation.function_spans(SCOPED, ["Box.gone", "nothing", "outer"])
    # a class is not a function: its methods are named one by one
    with pytest.raises(ValueError, match="no function Box in"):
        mutation.function_spans(SCOPED, ["Box"])


def test_the_command_line_refuses_a_scope_not_in_the_module(capsys):
    assert mutation.main(["--functions", "Supervisor.no_such_method", "kit/run/supervisor.py"]) == 2
    assert "Supervisor.no_such_method" in capsys.readouterr().err
