"""The ``badexpert`` parser and entry point.

User errors print one line, ``badexpert: error: ...``, and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from badexpert import build, calibrate, demo, evaluate, models
from defense.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="badexpert",
        description="Inference-time backdoor guard for image classifiers (BaDExpert). "
                    "Build a guard bundle from a suspect model and a few clean images, evaluate it, serve it.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    build.add_parser(commands)
    calibrate.add_parser(commands)
    evaluate.add_parser(commands)
    try:
        from badexpert import audit, serve
    except ImportError:  # the server's dependencies are optional for the offline job
        pass
    else:
        serve.add_parser(commands)
        audit.add_parser(commands)
    demo.add_parser(commands)
    models.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"badexpert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("badexpert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
