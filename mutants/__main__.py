"""``python -m mutants`` (from the repository's root): the kill matrix, and ``blind``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mutants import blind, matrix


def main(argv: Sequence[str] | None = None) -> int:
    args_given = list(sys.argv[1:] if argv is None else argv)
    if args_given[:1] == ["blind"]:
        return blind.main(args_given[1:])
    parser = argparse.ArgumentParser(
        prog="python -m mutants",
        description="the kill matrix: run the conformance suite against every mutant of the "
        "zoo; exit 1 if one survives or the reference fails anything",
        epilog="python -m mutants blind --help: the blind engines of tests/blind*.py (caught, "
        "escaped, false failures)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the matrix entries there")
    parser.add_argument("--backend", choices=("real", "fake", "both"), default="real")
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=os.cpu_count() or 2,
        help="pytest sessions at a time (default: the number of CPUs)",
    )
    parser.add_argument(
        "--mutant",
        action="append",
        default=[],
        metavar="SLUG",
        help="only this mutant (repeatable; the baselines run too)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="run only the K-th of N disjoint, cost-balanced parts of the "
        "sessions (the same parts on every machine)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="FILE",
        help="judge the --json files of every shard together; run nothing",
    )
    parser.add_argument(
        "--focus",
        action="store_true",
        help="every mutant session runs only the tests of the requirements it declares "
        "(the fake backend's always do): the same kills, several times faster, but "
        "'failed' lists only those",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the zoo and the requirements no mutant kills; run nothing",
    )
    args = parser.parse_args(args_given)
    part = None
    if args.shard is not None:
        try:
            part = matrix.parse_shard(args.shard)
        except ValueError as exc:
            parser.error(str(exc))
    if args.combine and (part or args.mutant or args.list):
        parser.error("--combine judges saved shards: it takes no --shard, --mutant or --list")
    try:
        return matrix.main(
            args.json,
            args.backend,
            args.jobs,
            args.mutant,
            args.list,
            part,
            args.combine or (),
            focus=matrix.BACKENDS if args.focus else matrix.FOCUSED_BACKENDS,
        )
    except ValueError as exc:  # an unknown --mutant, an unreadable --combine file
        print(f"python -m mutants: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    matrix.interruptible()  # the program's alone: a caller's signals stay its own
    sys.exit(main())
