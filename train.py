"""Train MulModSeg on unpaired CT and MR folders: ``python train.py --ct_dir CT --mr_dir MR --out runs/x``.

The script of the installed ``mulmodseg-train``: both run ``mulmodseg.cli.train.main``; see ``--help``.
"""

import sys

from mulmodseg.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
