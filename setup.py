from setuptools import find_packages, setup

setup(
    name="mulmodseg",
    version="0.1.0",
    description="One model for unpaired CT and MR segmentation (MulModSeg, WACV 2025) in pure PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["mulmodseg", "mulmodseg.*"]),
    package_data={"mulmodseg.text": ["bpe_simple_vocab_16e6.txt.gz", "LICENSE-CLIP"]},
    install_requires=["torch", "nibabel", "numpy", "scipy", "ftfy", "regex"],
    extras_require={
        # Oracles only: the package never imports these.
        "test": ["pytest", "monai>=1.3", "einops", "transformers>=4.40", "safetensors"],
    },
)
