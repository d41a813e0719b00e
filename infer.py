"""Segment CT or MR scans with a trained checkpoint: ``python infer.py --checkpoint runs/x/last.pt --modality MR
--input scan.nii.gz --output out/``.

The script of the installed ``mulmodseg-predict``: both run ``mulmodseg.cli.predict.main``; see ``--help``.
"""

import sys

from mulmodseg.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
