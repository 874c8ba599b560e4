"""The ``mosbits`` command line (also ``python -m mosbits``).

Each subcommand is a module with a one-line ``SUMMARY``, ``add_arguments(parser)`` and ``run(args) -> int``
(the exit status); adding one is one entry in `COMMANDS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from mosbits import __version__
from mosbits.cli import bench, binarize, calibrate, convert, demo, inspect

COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "bench": bench,
    "inspect": inspect,
    "binarize": binarize,
    "calibrate": calibrate,
    "convert-binarymos": convert,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mosbits`` parser with one subparser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="mosbits", description="Packed 1-bit weights with token-adaptive Mixture-of-Scales (BinaryMoS)."
    )
    parser.add_argument("--version", action="version", version=f"mosbits {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.SUMMARY, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mosbits COMMAND [options]`` (``argv`` defaults to ``sys.argv[1:]``); return the exit status.

    Usage errors exit through argparse with status 2.
    """
    args = build_parser().parse_args(argv)
    return args.run(args)
