"""The command-line programs: ``mulmodseg.cli.train`` (train.py, ``mulmodseg-train``) and
``mulmodseg.cli.predict`` (infer.py, ``mulmodseg-predict``), and what every program shares (also
``python -m mulmodseg.evaluate``, ``python -m mulmodseg.text`` and experiments/).

Exit codes (``exit_code``, the README's table): 0 done; ``EXIT_SYSTEM_ERROR`` (1) the system failed (an
``OSError``: a disk filled up, ...); ``EXIT_BAD_ARGUMENTS`` (2) bad arguments (argparse's own, and values that cannot
work: a ``mulmodseg.errors.UserError`` or ``ValueError``); ``EXIT_DATA_ERROR`` (3) a problem in the data or the
folders given, found by the checks before any work (``mulmodseg.data.DataError``, the one ``UserError`` with a code
of its own); ``EXIT_INTERRUPTED`` (130, the shell's code for Ctrl-C) interrupted. Each is printed as one line
(``report``); any other exception is a bug, with its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mulmodseg import __version__
from mulmodseg.errors import UserError

EXIT_SYSTEM_ERROR = 1
EXIT_BAD_ARGUMENTS = 2
EXIT_DATA_ERROR = 3
EXIT_INTERRUPTED = 130
# The end of each program's --help.
EXIT_CODES_HELP = (f"exit codes: 0 done, {EXIT_SYSTEM_ERROR} system error, {EXIT_BAD_ARGUMENTS} bad arguments, "
                   f"{EXIT_DATA_ERROR} a problem in the data or the folders given (found before any work), "
                   f"{EXIT_INTERRUPTED} interrupted (Ctrl-C)")


def exit_code(error: BaseException) -> int:
    """The exit status of a program stopped by ``error`` (the module's table)."""
    # Imported here: the text command shares these codes without loading the data layer.
    from mulmodseg.data import DataError

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, DataError):
        return EXIT_DATA_ERROR
    if isinstance(error, (UserError, ValueError)):
        return EXIT_BAD_ARGUMENTS
    return EXIT_SYSTEM_ERROR


def report(error: Exception, hint: str = "") -> int:
    """Print ``error`` (and ``hint``, what to do) as ``error: ...`` on stderr; returns its ``exit_code``."""
    print(f"error: {error}{hint}", file=sys.stderr)
    return exit_code(error)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, except where it is None or empty (the help then says what happens)
    or the help text already names it: no "(default: OUT/cache) (default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ``--channels_last`` values -> ``TrainConfig.channels_last`` / ``InferenceSettings.channels_last`` (None: auto).
CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def add_cpu_speed_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The ``--channels_last`` and ``--threads`` flags of train.py and infer.py."""
    parser.add_argument("--channels_last", nargs="?", const="on", choices=list(CHANNELS_LAST), default="auto",
                        help="channels_last_3d memory format for the network and its inputs: auto (on for the UNet on "
                        "the CPU, where it measured faster, see bench/RESULTS.md; off otherwise), on, or off; "
                        "a bare --channels_last is on")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: the cores this process may use, shared among "
                        "torchrun's ranks on this machine)")


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``--version``: prints the program's name and ``mulmodseg.__version__``, then exits 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def program_name(module: str) -> str | None:
    """The ``prog`` of a program that runs as ``python -m module`` and as an installed command: that spelling when
    started with ``-m``, None (argparse's own, the command's name: ``mulmodseg-evaluate``) otherwise."""
    return f"python -m {module}" if Path(sys.argv[0]).suffix == ".py" else None
