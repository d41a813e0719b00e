"""mulmodseg: one segmentation model for unpaired CT and MR scans (MulModSeg, WACV 2025).

Submodules are imported on demand (``mulmodseg.nets``, ``mulmodseg.text``, ``mulmodseg.model``, ...) so
that each one stays copyable on its own.
"""

__version__ = "0.1.0"
