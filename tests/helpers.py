"""Plain helpers for the mulmodseg.data tests: tiny synthetic NIfTIs written per test, and the bundled sample."""
from pathlib import Path

import nibabel as nib
import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def write_nifti(path, array, affine=None, dtype=None):
    """Write `array` as NIfTI (.nii or .nii.gz by name); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def with_sform(path, affine):
    """Rewrite the NIfTI at `path` with `affine` as its sform and no qform: nibabel writes no qform for a
    NaN or collapsed affine, so such broken headers are made this way."""
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), str(path))
    assert np.array_equal(nib.load(str(path)).affine, affine, equal_nan=True)


def tiny(value=0, shape=(8, 8, 8), dtype=np.int16):
    return np.full(shape, value, dtype=dtype)
