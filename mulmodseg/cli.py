"""What the command-line programs (train.py, infer.py, experiments/) share."""
from __future__ import annotations

import argparse


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
