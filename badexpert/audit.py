"""``badexpert audit verify FILE``: check the hash chain of an audit log written by ``serve --audit-chain``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defense.errors import UserError


def add_parser(commands) -> None:
    add_audit_arguments(commands.add_parser("audit", help="check a chained audit log written by serve",
                                            description="Tools for the server's audit log."))


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="audit_action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check the hash chain of an audit log written with --audit-chain",
                                description="Check that no line of a chained audit log was deleted, edited or inserted. "
                                            "Exit 0: intact; 1: broken (the line is named); 2: bad input.")
    verify.add_argument("file", type=Path, metavar="FILE", help="the audit log (JSON lines)")
    verify.add_argument("--head", metavar="DIGEST",
                        help="the last line's digest as recorded earlier (detects lines cut from the end)")
    verify.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    from service.audit import ChainBroken, verify_chain

    if not args.file.is_file():
        raise UserError(f"FILE {args.file}: no such file")
    try:
        report = verify_chain(args.file, args.head)
    except ChainBroken as error:
        print(f"badexpert: error: {args.file}: {error}", file=sys.stderr)
        return 1
    if report.first_chained_line is None:
        print(f"badexpert: error: {args.file}: no chained line ({report.lines} lines; was --audit-chain on?)",
              file=sys.stderr)
        return 1
    print(f"{args.file}: {report.lines} lines, chain intact from line {report.first_chained_line}; "
          f"head {report.head}")
    return 0
