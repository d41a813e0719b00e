"""``python -m mulmodseg.text``: the command of ``mulmodseg.cli.text`` (``mulmodseg-text``); see ``--help``."""

import sys

from mulmodseg.cli.text import main

if __name__ == "__main__":
    sys.exit(main())
