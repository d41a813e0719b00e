"""Train MulModSeg on unpaired CT and MR folders: ``python train.py --ct_dir CT --mr_dir MR --out runs/x``.

The script of the installed ``mulmodseg-train``: both run ``mulmodseg.cli.train.main``; see ``--help``.
"""

import sys

# Re-exported for the programs and tests that ``import train`` (experiments/run.py).
from mulmodseg.cli.train import build_parser, config_from_args, given_fields, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
