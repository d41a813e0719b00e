"""``python -m mulmodseg.evaluate``: the command of ``mulmodseg.cli.evaluate`` (``mulmodseg-evaluate``), which
scores a folder of label maps with ``mulmodseg.scoring.evaluate_folders``; see ``--help``."""

import sys

from mulmodseg.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
