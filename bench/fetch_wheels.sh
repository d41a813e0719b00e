#!/usr/bin/env bash
# Download, on this machine, the wheels that bench/gpu.sh needs on the lent GPU machine, which has
# PyTorch but no package index and lacks monai (the peers), nibabel, ftfy, wcwidth and regex.
# They land in .whl/ (git-ignored); carry it with the device call: carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "monai==1.6.1" "nibabel==5.4.2" "ftfy==6.3.1" "wcwidth==0.9.4" regex
ls -l .whl
