"""Preprocessing that would destroy a scan is refused, naming the file and what happens (issue 28): settings that
cannot work, a header whose voxel sizes collapse the scan, a labelled class that resampling loses."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mulmodseg.data import DataError, preprocess, resolve_settings
from mulmodseg.data.preprocess import grid_problems, intensity_problem


def scan(path: Path, array: np.ndarray, voxel_mm: float) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([voxel_mm] * 3 + [1.0])), path)
    return path


def ct(shape=(32, 32, 32)) -> np.ndarray:
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 4:-4, 4:-4] = np.random.default_rng(0).integers(-100, 200, [n - 8 for n in shape])
    return image


def test_a_header_in_metres_is_refused_before_any_voxel_is_read(tmp_path):
    # 0.001 mm voxels (metres written as mm): 32 voxels make 0.032 mm, one voxel at 1.5 mm. It trained on an all-
    # background label and segmented an empty map, without a word.
    image = scan(tmp_path / "metres.nii.gz", ct(), 0.001)
    with pytest.raises(DataError) as err:
        preprocess(image, modality="CT")
    assert err.value.problems == [
        f"{image}: its voxels of 0.001 0.001 0.001 mm (RAS) make a grid of 1 x 1 x 1 voxels from 32 x 32 x 32 at the "
        "training spacing 1.5 1.5 2 mm: the scan would collapse to a single voxel along an axis; check the voxel sizes "
        "in its header (written in metres or cm instead of mm?)"]


def test_a_labelled_class_that_resampling_loses_is_an_error(tmp_path):
    label = np.zeros((32, 32, 32), np.uint8)
    label[8:20, 8:20, 8:20] = 1
    label[24, 24, 24] = 2  # one 1 mm voxel: nearest-neighbour resampling to 4 mm misses it
    image = scan(tmp_path / "ct.nii.gz", ct(), 1.0)
    labels = scan(tmp_path / "ct_gt.nii.gz", label, 1.0)
    with pytest.raises(DataError) as err:
        preprocess(image, labels, "CT", spacing=[4, 4, 4], min_size=None)
    assert err.value.problems == [
        f"{labels}: class(es) [2] have no voxel left on the training grid (voxels of 1 1 1 mm resampled to 4 4 4 mm, "
        "32 x 32 x 32 -> 8 x 8 x 8): use a finer --spacing, or check the voxel sizes in the header of the image"]
    _, kept, _ = preprocess(image, labels, "CT", spacing=[1, 1, 1], min_size=None)
    assert sorted(np.unique(kept)) == [0, 1, 2]


def test_a_scan_shrunk_below_the_crop_is_a_warning_naming_its_grid():
    affine = np.diag([0.1, 0.1, 0.1, 1.0])  # 100 voxels of 0.1 mm: 7 at 1.5 mm, under a 96 crop
    problems, warnings = grid_problems("a.nii.gz", (100, 100, 100), affine, resolve_settings("CT", {}))
    assert problems == [] and warnings == [
        "a.nii.gz: its voxels of 0.1 0.1 0.1 mm (RAS) make a grid of 7 x 7 x 5 voxels from 100 x 100 x 100 at the "
        "training spacing 1.5 1.5 2 mm, smaller than the 96 x 96 x 96 crop: check the voxel sizes in its header"]
    # A scan that was smaller than the crop to begin with (an MR of 20 slices) is padded, as always.
    assert grid_problems("b.nii.gz", (200, 200, 20), np.diag([1.0, 1.0, 3.0, 1.0]), resolve_settings("MR", {})) == (
        [], [])


def test_settings_that_would_destroy_every_scan_are_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="spacing 0 0 0: give three voxel sizes in mm"):
        resolve_settings("CT", {"spacing": [0, 0, 0]})
    with pytest.raises(ValueError, match="window 275 -125: give the low end, then a higher high end"):
        preprocess(scan(tmp_path / "ct.nii.gz", ct(), 1.0), modality="CT", window=[275, -125])


def test_intensities_that_normalisation_would_flatten():
    mr = resolve_settings("MR", {})
    assert intensity_problem("c.nii.gz", 7.0, 7.0, {}) == (
        "c.nii.gz: every voxel has the value 7 (or nearly): a blank or constant scan, nothing to segment")
    assert intensity_problem("ct.nii.gz", -3000.0, -1000.0, resolve_settings("CT", {})).startswith(
        "ct.nii.gz: its values -3000..-1000 lie outside the intensity window -125 275")
    assert intensity_problem("mr.nii.gz", 0.0, 900.0, mr, clip=(0.0, 0.0)) == (
        "mr.nii.gz: its 0.5th and 99.5th percentiles are both 0 (most voxels hold one value), so every voxel would get "
        "one value")
    assert intensity_problem("mr.nii.gz", 0.0, 900.0, mr, clip=(3.0, 800.0)) is None
