"""Reports that nothing can break (issue 15): engine-controlled strings cannot leave their
place in summary.md or report.html (checked by parsing the output), and ``python -m
conformance report``/``diff`` refuse malformed, deeply nested or wrongly typed JSON with exit 2
and a message, never a traceback. The report's JSON Schema is published and enforced."""

from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_render import make_doc

from conformance import diff, render, rootcause, schema
from conformance import report as report_module

ROOT = Path(__file__).resolve().parent.parent

#: Strings an engine controls can hold anything: these try to leave their block.
HOSTILE = [
    "```",
    "````````",
    "~~~",
    "\n```\n# escaped heading\n```\n",
    "<img src=x onerror=alert(1)>",
    "<a href='javascript:alert(1)'>click</a>",
    "</pre></details></svg><script>alert(1)</script>",
    "\"><b x=\"",
    "' onmouseover='x",
    "]]>",
    "-->",
    "<!--",
    "\n# heading\n",
    "\n| a | b |\n",
    "[link](http://evil.example)",
    "![img](http://evil.example/x.png)",
    "**bold** _em_",
    "\x1b[31mred\x1b[0m",
    "\r\n\r",
    "\x00\x07\x08",
    "\u202eevil\u202c",
    "\n\n---\n",
    "&amp;",
    "${{ secrets.TOKEN }}",
    "http://evil.example",
    "www.evil.example",
    "\\",
    "`",
    "\t",
    "1. item",
    "- item",
    "> quote",
    "<details open>",
    "|",
    "~~strike~~",
    "<https://a.example>",
]
#: Fields the kit or the suite controls and the renderers key on (kept as they are).
STRUCTURAL = {
    "requirement",
    "subject",
    "level",
    "outcome",
    "kind",
    "role",
    "flow",
    "scenario",
    "backend",
    "hook",
    "hook_role",
    "child_role",
    "id",
    "runs",
    "section",
    "stage",
    "tests",
    "test",
    "schema_version",
    "suite_version",
    "flows",
}


def engine_doc() -> dict:
    """A report whose runs recorded a leftover process, a raising hook and RPC errors, and
    whose results carry messages quoting them."""
    entries = [
        ("ORDER-001", "root", "passed", ""),
        ("PRIV-MASTER-001", "suid", "failed", ""),
        ("EXIT-001", "root", "not-decided", ""),
        ("CLEAN-001", "suid", "failed", ""),
        ("NS-001", "root", "broken", "harness error"),
    ]
    doc = make_doc(entries)
    for run in doc["runs"]:
        events = run["ledger"]["events"]
        extra = [
            {
                "kind": "leak",
                "role": "supervisor",
                "pid": 1,
                "tid": 1,
                "what": "process",
                "detail": "pid 77 argv ['sleep', '100']",
            },
            {
                "kind": "hook_raise",
                "role": "master",
                "pid": 10,
                "tid": 11,
                "hook": "cleanup_container",
                "error": {
                    "type": "OSError",
                    "message": "umount",
                    "traceback": "Traceback (most recent call last):\n  boom\nOSError: umount",
                },
            },
            {
                "kind": "rpc_call",
                "role": "rpc",
                "pid": 2,
                "tid": 2,
                "method": "e.mount",
                "args": {"target": "/x"},
                "ok": False,
                "error": "EPERM mounting /x",
            },
        ]
        for event in extra:
            event["seq"] = len(events)
            events.append(event)
        run["stdout"], run["stderr"], run["argv"] = "out", "err", ["/bin/true", "arg"]
    for e in doc["results"]:
        if e["outcome"] == "failed":
            e["message"] = (
                f"{e['requirement']} [MUST] text\n  flow: {e['flow']}   role: "
                "master   hook: create_container\n  expected: a thing\n  observed: "
                "a leftover process pid 77 argv ['sleep', '100']\n  ledger event: "
                f"#20 leak role=supervisor pid=1 tid=1\n  run: {e['flow']}/default"
            )
    doc["known_failures"] = [
        {
            "requirement": "ORDER-001",
            "flows": ["root"],
            "reason": "upstream does the same",
            "where": "kf.txt:1",
        }
    ]
    doc["unchecked"] = [
        {
            "requirement": "NS-002",
            "level": "MUST",
            "section": "§4",
            "text": "a text",
            "reason": "no test yet",
        }
    ]
    return doc


def transformed(doc: dict, change) -> dict:
    """``doc`` with ``change`` applied to every string value that is not structural, then the
    not-decided results pointed at their run's (changed) root cause."""

    def walk(value, key=None):
        if isinstance(value, dict):
            return {k: (v if k in STRUCTURAL else walk(v, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        return change(value) if isinstance(value, str) else value

    out = walk(copy.deepcopy(doc))
    causes = {r["id"]: rootcause.of_run_doc(r) for r in out["runs"]}
    for e in out["results"]:
        if e["outcome"] == "not-decided":
            e["message"] = causes[e["runs"][0]].message
    assert schema.validate(out) == [] and report_module.validate(out) == []
    return out


# --- parsing the output ------------------------------------------------------------------------


class _Structure(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, tuple[str, ...]]] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(sorted(name for name, _ in attrs))))
        self.ids += [v for k, v in attrs if k == "id"]

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_comment(self, data):
        self.tags.append(("<!--", ()))


def html_structure(text: str) -> _Structure:
    parser = _Structure()
    parser.feed(text)
    parser.close()
    return parser


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SPECIALS = re.compile(r"(?<!\\)(<|\[|\]|\*|_|~|://|www\.|(?<![|\s])\|(?![|\s]))")


def md_structure(text: str) -> list[tuple[str, int]]:
    """(block kind, unescaped inline specials outside code) per line, CommonMark's fenced
    code blocks followed to their real end."""
    out, fence = [], None
    for line in text.split("\n"):
        if fence is not None:
            closing = re.match(r"^ {0,3}(`{3,}|~{3,})\s*$", line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence):
                fence = None
                out.append(("fence-close", 0))
            continue
        opening = _FENCE.match(line)
        if opening:
            fence = opening.group(1)
            out.append(("fence-open", 0))
            continue
        if not line.strip():
            kind = "blank"
        elif re.match(r"^ {0,3}#{1,6}(\s|$)", line):
            kind = "heading"
        elif re.match(r"^ {0,3}>", line):
            kind = "quote"
        elif re.match(r"^ {0,3}([-+*]|\d+[.)])(\s|$)", line):
            kind = "list"
        elif line.startswith("|"):
            kind = f"table{line.count(' | ')}"
        elif re.match(r"^ {0,3}<", line):
            kind = "html"
        else:
            kind = "paragraph"
        inline = re.sub(r"(?<![`\\])(`+)(?!`).*?(?<!`)\1(?!`)", "", line)  # inert code spans
        inline = inline.replace("\\\\", "")  # an escaped backslash escapes nothing after it
        out.append((kind, len(_SPECIALS.findall(inline))))
    assert fence is None, "a code block is never closed"
    return out


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u202a-\u202e]")


@pytest.mark.parametrize("seed", range(24))
def test_fuzzed_engine_strings_cannot_change_the_structure_of_the_reports(seed):
    rng = random.Random(seed)
    base = engine_doc()
    benign = transformed(base, lambda s: s + " plain words")
    hostile = transformed(base, lambda s: s + " " + "".join(rng.sample(HOSTILE, 4)))
    for doc in (benign, hostile):
        assert render.verdict(doc).root_causes, "the fuzz covers the root-cause section"
    md_ok, md_bad = render.summary_markdown(benign), render.summary_markdown(hostile)
    assert md_structure(md_bad) == md_structure(md_ok)
    html_ok, html_bad = render.html_report(benign), render.html_report(hostile)
    good, bad = html_structure(html_ok), html_structure(html_bad)
    assert bad.tags == good.tags  # no injected element or attribute, none lost
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in bad.ids)
    for text in (md_bad, html_bad):
        assert not CONTROL.search(text)
    assert md_structure(diff.markdown(benign, hostile)) == md_structure(
        diff.markdown(benign, benign)
    )


def test_a_leftover_process_argv_stays_inside_its_code_block():
    doc = engine_doc()
    argv = "<img src=x onerror=alert(1)> <a href=//evil>x</a> ```"
    for e in doc["results"]:
        if e["outcome"] == "failed":
            e["message"] = e["message"].replace("['sleep', '100']", argv)
    md = render.summary_markdown(doc)
    inside = False
    for line in md.split("\n"):
        if _FENCE.match(line):
            inside = not inside if not inside or line.strip("`~ ") == "" else inside
        if "<img" in line:
            assert inside, line


# --- the schema ---------------------------------------------------------------------------


def test_the_published_schema_is_a_file_of_the_package_and_versioned():
    data = json.loads(schema.SCHEMA_FILE.read_text())
    assert schema.SCHEMA_FILE.parent.name == "conformance"
    assert report_module.SCHEMA_VERSION in data["properties"]["schema_version"]["enum"]
    assert "report.schema.json" in (ROOT / "pyproject.toml").read_text()


def test_a_string_seq_is_refused_before_it_reaches_an_element_id():
    doc = make_doc([("ORDER-001", "root", "passed", "")])
    doc["runs"][0]["ledger"]["events"][3]["seq"] = '3" onmouseover="alert(1)'
    with pytest.raises(
        render.ReportError,
        match=r"\$\.runs\[0\]\.ledger\.events\[3\]\.seq: "
        "expected integer, got string",
    ):
        render.checked(doc)
    # and the renderer alone (no validation) still cannot put it into an attribute
    html = render.html_report(doc)
    assert bad_attributes(html) == []


def bad_attributes(html: str) -> list[str]:
    return [
        f"{tag} {attrs}"
        for tag, attrs in html_structure(html).tags
        if any(a.startswith("on") for a in attrs)
    ]


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("results", 0, "checks"), "3", r"\$\.results\[0\]\.checks: expected integer"),
        (("results", 0, "outcome"), "great", r"\$\.results\[0\]\.outcome: 'great' is not one of"),
        (("results",), {"a": 1}, r"\$\.results: expected array, got object"),
        (
            ("runs", 0, "ledger", "events", 0, "snapshot"),
            {"threads": [{"uid": [1]}]},
            r"threads\[0\]\.uid: 1 items, at least 4",
        ),
        (("engine", "name"), ["x"], r"\$\.engine\.name: expected string, got array"),
    ],
)
def test_wrongly_typed_fields_are_refused_with_their_path(path, value, message):
    doc = make_doc([("ORDER-001", "root", "passed", "")])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(render.ReportError, match=message):
        render.checked(doc)


def test_a_deeply_nested_document_is_refused_without_walking_it():
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    assert schema.too_deep(deep)
    doc = make_doc([("ORDER-001", "root", "passed", "")])
    doc["runs"][0]["engine_config"] = {"x": json.loads("[" * 100 + "]" * 100)}
    with pytest.raises(render.ReportError, match="nested deeper than 64 levels"):
        render.checked(doc)


def test_a_validator_boundary_at_the_depth_limit():
    at, over = [], []
    node, node2 = at, over
    for _ in range(schema.MAX_DEPTH - 1):
        node.append([])
        node = node[0]
    for _ in range(schema.MAX_DEPTH):
        node2.append([])
        node2 = node2[0]
    assert not schema.too_deep(at) and schema.too_deep(over)


# --- the commands ------------------------------------------------------------------------------


def _command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conformance", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = make_doc([("ORDER-001", "root", "passed", "")])
    wrong = copy.deepcopy(good)
    wrong["results"][0]["runs"] = "root/default"
    typed = copy.deepcopy(good)
    typed["runs"][0]["ledger"]["events"][2]["seq"] = "2"
    files = {
        "not json": "{results: [",
        "deep": "[" * 200_000 + "]" * 200_000,
        "array": "[1, 2]",
        "wrong types": json.dumps(wrong),
        "string seq": json.dumps(typed),
        "binary": None,
        "empty": "",
    }
    out = {}
    for name, text in files.items():
        path = tmp_path / f"{name.replace(' ', '-')}.json"
        if text is None:
            path.write_bytes(b"\xff\xfe\x00garbage\x9f")
        else:
            path.write_text(text)
        out[name] = path
    out["missing"] = tmp_path / "missing.json"
    (tmp_path / "good.json").write_text(json.dumps(good))
    return out


def test_report_and_diff_refuse_bad_files_with_exit_2_and_one_message(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        for args in (
            ("report", str(path), "--out", str(tmp_path / "o")),
            ("diff", str(path), str(tmp_path / "good.json")),
            ("diff", str(tmp_path / "good.json"), str(path)),
        ):
            proc = _command(*args, cwd=tmp_path)
            assert proc.returncode == 2, (name, args, proc.stderr[-2000:])
            assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr, name
            assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
            assert str(path.name) in proc.stderr, (name, proc.stderr)
