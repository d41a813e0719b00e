"""mulmodseg.data.checks (issue 28): scans with no intensity range, scans that the preprocessing settings would
collapse or flatten, a label put on its image by its own affine, a header claiming more than memory, and an
earlier inference's output that cannot be kept."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mulmodseg.data import Case, DataError, check_cases, resolve_settings
from mulmodseg.data.checks import existing_output_problems


def write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def body(shape=(16, 16, 12), low=-1000, high=300) -> np.ndarray:
    return np.random.default_rng(0).integers(low, high, shape).astype(np.int16)


def test_a_constant_scan_is_a_problem_of_every_modality(tmp_path):
    # A constant MR trained and was segmented without a word; a constant CT only had the "no air" warning.
    mr = write(tmp_path / "mr.nii.gz", np.full((16, 16, 12), 250.0, np.float32))
    ct = write(tmp_path / "ct.nii.gz", np.full((16, 16, 12), -1000, np.int16))
    with pytest.raises(DataError) as err:
        check_cases([Case("mr", mr, None, "MR"), Case("ct", ct, None, "CT")])
    assert err.value.problems == [
        f"{mr}: every voxel has the value 250 (or nearly): a blank or constant scan, nothing to segment",
        f"{ct}: every voxel has the value -1000 (or nearly): a blank or constant scan, nothing to segment"]


def test_with_the_settings_a_scan_they_would_flatten_or_collapse_is_a_problem(tmp_path):
    cold = write(tmp_path / "cold.nii.gz", body(low=-3000, high=-1000))  # every voxel below the CT window
    zeros = np.zeros((16, 16, 12), np.float32)
    zeros[0, 0, :5] = [1, 2, 3, 4, 5]  # 99.7 % zeros: the 0.5th and 99.5th percentiles are both 0
    sparse = write(tmp_path / "sparse.nii.gz", zeros)
    metres = write(tmp_path / "metres.nii.gz", body(), np.diag([0.001, 0.001, 0.001, 1.0]))
    small = write(tmp_path / "small.nii.gz", body((20, 20, 20)), np.diag([0.2, 0.2, 0.2, 1.0]))
    cases = [Case("cold", cold, None, "CT"), Case("sparse", sparse, None, "MR"), Case("metres", metres, None, "CT")]
    settings = {"CT": [resolve_settings("CT", {"min_size": [16, 16, 16]})],
                "MR": [resolve_settings("MR", {"min_size": [16, 16, 16]})]}
    check_cases(cases[:2])  # without the settings, only the scans themselves are judged
    with pytest.raises(DataError) as err:
        check_cases(cases, settings=settings)
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{cold}: its values -3000..-1001 lie outside the intensity window -125 275")
    assert problems[1] == (f"{sparse}: its 0.5th and 99.5th percentiles are both 0 (most voxels hold one value), so "
                           "every voxel would get one value")
    assert problems[2].startswith(f"{metres}: its voxels of 0.001 0.001 0.001 mm (RAS) make a grid of 1 x 1 x 1")
    warnings = check_cases([Case("small", small, None, "CT")], settings=settings)
    assert warnings == [f"{small}: its voxels of 0.2 0.2 0.2 mm (RAS) make a grid of 3 x 3 x 2 voxels from 20 x 20 x "
                        "20 at the training spacing 1.5 1.5 2 mm, smaller than the 16 x 16 x 16 crop: check the voxel "
                        "sizes in its header"]


def test_a_label_in_other_axes_is_said_to_be_moved_by_its_own_affine(tmp_path):
    # Its affine is the image's turned by 90 degrees: read_label turns its voxels (most of them move), where the
    # warning said the image's affine was used.
    image = write(tmp_path / "a.nii.gz", body())
    label = np.zeros((16, 16, 12), np.uint8)
    label[2:6, 3:12, 2:10] = 1
    turned = np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    labels = write(tmp_path / "a_gt.nii.gz", label, turned)
    assert check_cases([Case("a", image, labels, "CT")]) == [
        f"{labels}: stored in other axes than the image (ALS against RAS): its voxels are flipped/transposed onto the "
        "image's axes by its own affine, after which its affine still differs from the image's by up to 15 (> 0.001), "
        f"and its voxels are taken to be the image's ({image}); check that the two belong together"]


def test_a_header_that_claims_more_than_memory_says_what_it_claims(tmp_path):
    # A 10000^3 int16 header over a few bytes was "unreadable or truncated (MemoryError)".
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).header
    header.set_data_shape((10000, 10000, 10000))
    header["vox_offset"] = 352
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    with pytest.raises(DataError) as err:
        check_cases([Case("huge", path, None, "CT")])
    (problem,) = err.value.problems
    assert problem.startswith(f"{path}: its header claims shape (10000, 10000, 10000) of int16, 2 TB, more than "
                              "this machine's memory (")
    assert problem.endswith("GB): a broken header, or a scan to crop or split first")


def test_an_earlier_output_that_cannot_be_kept(tmp_path):
    image = write(tmp_path / "a.nii.gz", body())
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    (problem,) = existing_output_problems(empty, image)
    assert problem.startswith(f"{empty}: unreadable or truncated earlier output")
    other = write(tmp_path / "other.nii.gz", np.zeros((16, 16, 11), np.uint8))
    assert existing_output_problems(other, image) == [
        f"{other}: earlier output shape (16, 16, 11) differs from scan shape (16, 16, 12) ({image})"]
    moved = write(tmp_path / "moved.nii.gz", np.zeros((16, 16, 12), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert existing_output_problems(moved, image)[0].startswith(f"{moved}: affine differs from the scan's by up to 1")
    good = write(tmp_path / "good.nii.gz", np.ones((16, 16, 12), np.uint8))
    assert existing_output_problems(good, image, num_classes=14) == []
    assert existing_output_problems(good, image, label_map={5: 1}) == [
        f"{good}: earlier output values [1] are not in the label map"]
