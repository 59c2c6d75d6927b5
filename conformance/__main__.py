"""``python -m conformance catalogue``: print the requirement catalogue as Markdown; ``spec``:
print the contract;
``report``: render a saved JSON report; ``diff``: compare two reports; ``gate``: the
conformance gate of a pipeline."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from conformance.catalogue import markdown
from conformance.diff import diff_command
from conformance.gate import main as gate_main
from conformance.render import report_command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gate"]:  # its own parser: everything after "--" goes to pytest
        return gate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m conformance",
                                     description="the engine conformance suite")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gate", add_help=False,
                   help="the conformance suite as one pipeline step: junit.xml, "
                        "conformance.json, summary.md, report.html; exit 0 conformant, 1 not, "
                        "2 harness or usage error, 3 nothing could run here (gate --help)")
    sub.add_parser("catalogue", help="print every requirement, grouped by hook or concern, "
                                     "with the tests that check it (Markdown)")
    sub.add_parser("spec", help="print the contract the suite checks (SPEC.md)")
    report = sub.add_parser("report", help="render summary.md and report.html from a saved "
                                           "JSON report; exit status: its verdict (0 "
                                           "conformant, 1 not, 2 harness error, 3 nothing ran)")
    report.add_argument("json", help="the JSON report (--conformance-report)")
    report.add_argument("--out", metavar="DIR", help="where to write (default: beside it)")
    report.add_argument("--strict", action="store_true", default=None,
                        help="any failure, and anything not configured, is non-conformant")
    diff = sub.add_parser("diff", help="requirements whose outcome changed between two "
                                       "reports, regressions first (Markdown); exit 1 if any "
                                       "regressed")
    diff.add_argument("old")
    diff.add_argument("new")
    args = parser.parse_args(argv)
    if args.command == "catalogue":
        sys.stdout.write(markdown())
    elif args.command == "spec":
        sys.stdout.write((Path(__file__).parent / "SPEC.md").read_text())
    elif args.command == "report":
        return report_command(args.json, args.out, args.strict)
    elif args.command == "diff":
        return diff_command(args.old, args.new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
