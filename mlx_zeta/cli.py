"""The ``mlx-zeta`` command line: one entry point for every command (also ``python -m mlx_zeta``).

    mlx-zeta [--version] COMMAND [options]

The commands are registered by the layers that own them, each as one ``_add_<command>``
function listed in that module's ``COMMANDS``:

- :mod:`mlx_zeta.converters.cli`: ``convert`` (a Hugging Face checkpoint to an mlx_zeta
  folder, optionally cast and quantized) and ``export-coreml`` (a model folder to a Core ML
  package);
- :mod:`mlx_zeta.converters.coreai_cli`: ``export-coreai`` (a model folder to a Core AI bundle);
- :mod:`mlx_zeta.lm.cli`: ``generate`` (stream text from a prompt), ``chat`` (a terminal
  REPL that keeps the history and its KV cache), ``serve`` (an OpenAI-compatible HTTP
  server), and from :mod:`mlx_zeta.lm.tune_cli` ``lora`` (fine-tune with LoRA / DoRA
  adapters) and ``fuse`` (fold adapters into the weights).

Each handler takes the parsed ``argparse.Namespace`` and returns the exit status. This module
only parses and turns exceptions into exit statuses, the same for every command:

Exit status: 0 on success, 2 for a usage error or an input the library rejects (a one-line
message on stderr, ``mlx-zeta <command>: error: ...``, no traceback), 1 for an
operating-system error while reading or writing (silently when stdout is a pipe its reader
closed, as ``mlx-zeta generate ... | head`` does), 130 when interrupted (Ctrl-C, at any point:
one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mlx_zeta.converters import cli as _converters_cli
from mlx_zeta.converters import coreai_cli as _coreai_cli
from mlx_zeta.lm import cli as _lm_cli

PROG = _converters_cli.PROG
__all__ = ["main", "build_parser", "PROG"]


def _commands() -> tuple:
    """Every ``_add_<command>`` function, in the order ``--help`` lists them."""
    return (*_converters_cli.COMMANDS, *_coreai_cli.COMMANDS, *_lm_cli.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    """The ``mlx-zeta`` parser: ``--version`` and one subcommand per registered command."""
    from mlx_zeta import __version__

    parser = _Parser(prog=PROG, description="mlx_zeta model tools.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _commands():
        add(sub)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``mlx-zeta <command>: error: ... (see --help)``, unknown
    arguments reported by the command they were given to."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``mlx-zeta`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    command = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version (0) or a usage error (2), already printed by argparse
            return e.code if isinstance(e.code, int) else 2
        command = args.command
        return args.handler(args)
    except ValueError as e:  # the library's errors name the file, key or option at fault
        _fail(command, e)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`mlx-zeta generate ... | head`): stop quietly
        _silence_stdout()
        return 1
    except OSError as e:
        _fail(command, e)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}{f' {command}' if command else ''}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point the process's stdout at /dev/null, so that the interpreter's last flush at exit does
    not fail again on the closed pipe (the recipe of Python's signal documentation)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured by a test)
        pass


def _fail(command: Optional[str], error: BaseException) -> None:
    message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"{PROG} {command}: error: {message or type(error).__name__}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
