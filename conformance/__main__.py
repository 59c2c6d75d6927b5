"""``python -m conformance``: catalogue, spec, report, diff and gate commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from conformance.catalogue import markdown
from conformance.diff import diff_command
from conformance.gate import main as gate_main
from conformance.render import report_command
from conformance.report import merge_command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gate"]:  # its own parser: everything after "--" goes to pytest
        return gate_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m conformance", description="the engine conformance suite"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "gate",
        add_help=False,
        help="the conformance suite as one pipeline step: junit.xml, "
        "conformance.json, summary.md, report.html; exit 0 conformant, 1 not, "
        "2 harness or usage error, 3 nothing could run here (gate --help)",
    )
    sub.add_parser(
        "catalogue",
        help="print every requirement, grouped by hook or concern, "
        "with the tests that check it (Markdown)",
    )
    sub.add_parser("spec", help="print the contract the suite checks (SPEC.md)")
    report = sub.add_parser(
        "report",
        help="render summary.md and report.html from a saved "
        "JSON report, or merge shard reports (--merge); "
        "exit status: its verdict (0 conformant, 1 not, 2 "
        "harness error or shards that do not merge, 3 "
        "nothing ran)",
    )
    report.add_argument(
        "json",
        nargs="+",
        help="the JSON report (--conformance-report); with --merge, every shard's",
    )
    report.add_argument(
        "--merge",
        action="store_true",
        help="merge the reports of one session's shards (one per flow or per "
        "runner) into one: conformance.json, summary.md and report.html in "
        "--out DIR; each shard's environment is kept",
    )
    report.add_argument(
        "--out", metavar="DIR", help="where to write (default: beside it; required with --merge)"
    )
    report.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="any failure, and anything not configured, is non-conformant",
    )
    diff = sub.add_parser(
        "diff",
        help="requirements whose outcome changed between two "
        "reports, regressions first (Markdown); exit 1 if any "
        "regressed",
    )
    diff.add_argument("old")
    diff.add_argument("new")
    args = parser.parse_args(argv)
    if args.command == "catalogue":
        sys.stdout.write(markdown())
    elif args.command == "spec":
        sys.stdout.write((Path(__file__).parent / "SPEC.md").read_text())
    elif args.command == "report":
        if args.merge:
            return merge_command(args.json, args.out, args.strict)
        if len(args.json) != 1:
            parser.error(
                f"report: one JSON report, got {len(args.json)} (to merge shard "
                "reports, add --merge)"
            )
        return report_command(args.json[0], args.out, args.strict)
    elif args.command == "diff":
        return diff_command(args.old, args.new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
