"""The command-line programs, one module each: ``train`` (train.py, ``mulmodseg-train``), ``predict`` (infer.py,
``mulmodseg-predict``), ``evaluate`` (``python -m mulmodseg.evaluate``, ``mulmodseg-evaluate``) and ``text``
(``python -m mulmodseg.text``, ``mulmodseg-text``); here, what every program shares (experiments/ too).

Exit codes (``exit_code``, the README's table): 0 done; ``EXIT_SYSTEM_ERROR`` (1) the system failed (an
``OSError``: a disk filled up, ...); ``EXIT_BAD_ARGUMENTS`` (2) bad arguments (argparse's own, and values that cannot
work: a ``mulmodseg.errors.UserError`` or ``ValueError``); ``EXIT_DATA_ERROR`` (3) a problem in the data or the
folders given, found by the checks before any work (``mulmodseg.data.DataError``, the one ``UserError`` with a code
of its own); ``EXIT_INTERRUPTED`` (130, the shell's code for Ctrl-C) interrupted. Each is printed as one line
(``report``; ``run`` runs a program's work with both); any other exception is a bug, with its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
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
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, UserError):
        # Imported here: the text command (no UserError) reports its errors without loading the data layer.
        from mulmodseg.data import DataError

        return EXIT_DATA_ERROR if isinstance(error, DataError) else EXIT_BAD_ARGUMENTS
    if isinstance(error, ValueError):
        return EXIT_BAD_ARGUMENTS
    return EXIT_SYSTEM_ERROR


def report(error: Exception, hint: str = "") -> int:
    """Print ``error`` (and ``hint``, what to do) as ``error: ...`` on stderr; returns its ``exit_code``."""
    print(f"error: {error}{hint}", file=sys.stderr)
    return exit_code(error)


# What a program reports as one line (``run``): problems with what was given, and the system's.
ERRORS: tuple[type[Exception], ...] = (UserError, ValueError, OSError)


def run(work: Callable[[], object], on_interrupt: Callable[[KeyboardInterrupt], str],
        hint: Callable[[Exception], str] | None = None, *, errors: tuple[type[Exception], ...] = ERRORS,
        codes: Mapping[type[Exception], int] | None = None) -> int:
    """A program's ``work()`` with its exit status (the module's table): 0 when it returns; on Ctrl-C prints
    ``interrupted; `` and ``on_interrupt(error)`` (what is left, how to go on) instead of a traceback and returns
    ``EXIT_INTERRUPTED``; an error of a class in ``errors`` or ``codes`` is printed by ``report``, followed by
    ``hint(error)``, and returns the code of the first class in ``codes`` it belongs to, else its ``exit_code``.
    Any other exception propagates (a bug, with its traceback)."""
    codes = dict(codes or {})
    try:
        work()
    except KeyboardInterrupt as error:
        print(f"\ninterrupted; {on_interrupt(error)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (*errors, *codes) as error:
        code = report(error, hint(error) if hint else "")
        return next((c for cls, c in codes.items() if isinstance(error, cls)), code)
    return 0


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
