"""Segment CT or MR scans with a trained checkpoint: ``python infer.py --checkpoint runs/x/last.pt --modality MR
--input scan.nii.gz --output out/``.

The script of the installed ``mulmodseg-predict``: both run ``mulmodseg.cli.predict.main``; see ``--help``.
"""

import sys

# Re-exported for the programs and tests that ``import infer`` (experiments/run.py).
from mulmodseg.cli.predict import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
