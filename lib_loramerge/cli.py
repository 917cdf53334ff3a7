"""Command line: ``python -m lib_loramerge info|merge|bake|ui …``.

Every user error is one line ``error: <file>: <reason>`` on stderr and exit status 2, with no
traceback (``--debug`` shows it). Anything else is a bug: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import LoraMergeError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a LoraMergeError (so: exit 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LoraMergeError(f"{message} (see '{self.prog} --help')")


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_summary, inspect_lora

    summary = inspect_lora(args.file)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lib_loramerge",
                     description="Merge LoRAs exactly, bake them into checkpoints, inspect them.")
    parser.add_argument("--version", action="version", version=f"lib_loramerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="describe a LoRA file: format, architecture, modules, ranks, metadata")
    p.add_argument("file", help="a LoRA (.safetensors, or .pt/.ckpt read with the safe unpickler)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None, *, parser_factory: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser_factory().parse_args(argv)
        return int(args.func(args) or 0)
    except LoraMergeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("error: out of memory (try --device cpu, a smaller rank, or fewer inputs at once)", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
              "rerun with --debug for the traceback and please report it", file=sys.stderr)
        return 1
