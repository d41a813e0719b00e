"""mulmodseg: one segmentation model for unpaired CT and MR scans (MulModSeg, WACV 2025).

Submodules are imported on demand (``mulmodseg.nets``, ``mulmodseg.text``, ``mulmodseg.model``, ...) so
that each one stays copyable on its own. From the bottom up:

- ``nets`` (UNet, SwinUNETR) and ``model`` (the network, which imports only ``nets``);
- ``surface`` (surfels, NSD and HD95 of masks; numpy and scipy only), ``losses``, ``inferer``, ``metrics`` (Dice,
  each case's scores, summaries, the report files, model cost; imports ``surface``), and ``alt`` (the alternating
  training, which imports only losses, inferer and metrics);
- ``text`` (CLIP tokenizer, tower, weights and tables; nothing else of mulmodseg), ``data`` (scans, preprocessing,
  crops, cache), ``checkpoint`` (the file format, ``atomic_write``) and ``errors`` (``UserError``);
- a training run: ``config`` (settings and their checks), ``selection`` (which scans), ``training`` (the Trainer);
- inference: ``outputs`` (planning a call, the files it writes) and ``predict`` (``Segmenter``, ``segment_files``);
- the programs: ``evaluate`` and ``cli``.
"""

__version__ = "0.1.0"
