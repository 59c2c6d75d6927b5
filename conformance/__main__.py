"""``python -m conformance catalogue``: print the requirement catalogue as Markdown."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance",
                                     description="the engine conformance suite")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("catalogue", help="print every requirement, grouped by hook or concern, "
                                     "with the tests that check it (Markdown)")
    args = parser.parse_args(argv)
    if args.command == "catalogue":
        from conformance.catalogue import markdown

        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
