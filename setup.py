import re
from pathlib import Path

from setuptools import find_packages, setup

# One source of truth: mulmodseg.__version__, read as text (setup.py runs before torch is installed).
VERSION = re.search(r'^__version__ = "([^"]+)"', Path(__file__).with_name("mulmodseg").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.M).group(1)

setup(
    name="mulmodseg",
    version=VERSION,
    description="One model for unpaired CT and MR segmentation (MulModSeg, WACV 2025) in pure PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["mulmodseg", "mulmodseg.*"]),
    package_data={"mulmodseg.text": ["bpe_simple_vocab_16e6.txt.gz", "LICENSE-CLIP"]},
    install_requires=["torch", "nibabel", "numpy", "scipy", "ftfy", "regex"],
    # The same mains as train.py, infer.py, python -m mulmodseg.evaluate and python -m mulmodseg.text.
    entry_points={"console_scripts": [
        "mulmodseg-train = mulmodseg.cli.train:main",
        "mulmodseg-predict = mulmodseg.cli.predict:main",
        "mulmodseg-evaluate = mulmodseg.cli.evaluate:main",
        "mulmodseg-text = mulmodseg.cli.text:main",
    ]},
    extras_require={
        # Oracles only (and ruff, pinned so that the style check of .ci/run does not change under us): the package
        # never imports these.
        "test": ["pytest", "monai>=1.3", "einops", "transformers>=4.40", "safetensors", "ruff==0.17.6"],
    },
)
