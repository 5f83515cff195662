"""``vitdecomp`` entry point: argument parsing, logging, exit codes.

Exit codes: 0 success, 1 unexpected error, 2 bad input (unknown model, unreadable files,
bad arguments), 3 unsupported model, 4 decomposition failed its exactness check.
Every subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int`` and is
imported here without importing torch, so ``vitdecomp --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .. import __version__

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_INPUT", "EXIT_UNSUPPORTED", "EXIT_INEXACT"]

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_UNSUPPORTED, EXIT_INEXACT = 0, 1, 2, 3, 4
# One module per subcommand (``vitdecomp/cli/<name>_cmd.py``), in the order ``--help`` lists them.
COMMAND_MODULES = (
    "demo",
    "decompose",
    "align",
    "label",
    "score",
    "retrieve",
    "heatmap",
    "segment",
    "ablate",
    "debias",
    "models",
    "synth",
)

log = logging.getLogger("vitdecomp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitdecomp",
        description=(
            "Split a vision transformer's representation exactly into the direct contributions "
            "of its components (embedding, heads, MLPs, tokens), and check that they add up."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vitdecomp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help="only errors on stderr")
    common = argparse.ArgumentParser(add_help=False)  # the same flags after the subcommand
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}_cmd").add_parser(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not args.command:
        parser.print_help()
        return EXIT_INPUT
    from ..errors import DecompositionError, InputError, UnsupportedModelError

    try:
        return int(args.run(args))
    except UnsupportedModelError as exc:
        log.error("unsupported model: %s", exc)
        return EXIT_UNSUPPORTED
    except DecompositionError as exc:
        log.error("%s", exc)
        return EXIT_INEXACT
    except InputError as exc:
        log.error("%s", exc)
        return EXIT_INPUT
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
