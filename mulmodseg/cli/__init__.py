"""The command-line programs: ``mulmodseg.cli.train`` (train.py, ``mulmodseg-train``) and
``mulmodseg.cli.predict`` (infer.py, ``mulmodseg-predict``), and what every program shares (also
``python -m mulmodseg.evaluate``, ``python -m mulmodseg.text`` and experiments/).

Exit codes: 0 done; 1 the system failed (a disk filled up, ...); 2 bad arguments (argparse's own, and values
that cannot work: a ``mulmodseg.errors.UserError``, printed as one line); ``EXIT_DATA_ERROR`` (3) a data
problem found by the checks before any work (``mulmodseg.data.DataError``, the one ``UserError`` with a code of
its own); ``EXIT_INTERRUPTED`` (130, the shell's code for Ctrl-C) interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mulmodseg import __version__

EXIT_DATA_ERROR = 3
EXIT_INTERRUPTED = 130
# The end of each program's --help.
EXIT_CODES_HELP = (f"exit codes: 0 done, 1 system error, 2 bad arguments, {EXIT_DATA_ERROR} a problem in the data "
                   f"(reported before any work), {EXIT_INTERRUPTED} interrupted (Ctrl-C)")


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
