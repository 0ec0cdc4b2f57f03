"""The ``dcm`` command: ``dcm <command> [args ...]`` runs ``python -m <module> [args ...]``.

Each command hands the rest of the command line to its module's ``main(argv)`` unchanged, so
``dcm evaluate --help`` prints exactly what ``python -m dcm.evaluate --help`` prints. A command's module is
imported only when that command runs (``dcm --help`` loads neither torch nor MONAI). ``python -m dcm`` is
the same command.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, TextIO

__all__ = ["COMMANDS", "Command", "main", "usage"]

PROG = "dcm"


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``main(argv) -> int`` it runs, and its line in ``dcm --help``."""

    module: str
    summary: str

    def entry_point(self) -> Callable[[Optional[Sequence[str]]], int]:
        return importlib.import_module(self.module).main


COMMANDS: Dict[str, Command] = {
    "demo": Command("dcm.cli.demo", "end-to-end demo with the bundled small weights (table and figs/demo.png)"),
    "evaluate": Command("dcm.evaluate", "the challenge's 6-step evaluator on a folder of cases"),
    "segment": Command("dcm.cli.segment", "segment one object of a NIfTI image from a box and clicks"),
    "ablate": Command("dcm.cli.ablate", "several config variants through the evaluator, one comparison table"),
    "convert": Command("dcm.data.convert", "image + label NIfTI pair or nnU-Net dataset -> challenge cases"),
    "checkpoints": Command("dcm.checkpoints", "checkpoint tools (combine the two experts into DCM's file)"),
    "serve": Command("dcm.serve.__main__", "serve nnInteractive's remote protocol (napari, 3D Slicer) and the page"),
    "info": Command("dcm.cli.info", "versions, device and the precision path each expert would run here"),
}


def usage() -> str:
    """The text of ``dcm --help``: one line per command."""
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} <command> [args ...]", "",
             "DCM: interactive 3D medical image segmentation with a global-RoI and a local-RoI expert.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"'{PROG} <command> --help' describes a command. 'python -m dcm.<command>' runs the same code "
                  f"(python -m dcm.data.convert for convert)."]
    return "\n".join(lines) + "\n"


def _refuse(message: str, stream: TextIO) -> int:
    stream.write(f"usage: {PROG} <command> [args ...]\n{PROG}: error: {message}\n")
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dcm <command> [args ...]``; the exit status is the command's (2 for an unknown command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _refuse(f"a command is required ({', '.join(COMMANDS)}); see '{PROG} --help'", sys.stderr)
    if args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if args[0] == "--version":
        from dcm import __version__

        sys.stdout.write(f"{PROG} {__version__}\n")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        return _refuse(f"unknown command {args[0]!r} (choose from {', '.join(COMMANDS)})", sys.stderr)
    return command.entry_point()(args[1:])


if __name__ == "__main__":
    sys.exit(main())
