"""mulmodseg.data.checks: every problem of the input files and of an earlier inference's output, reported at once."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SAMPLE, tiny, with_sform, write_nifti

from mulmodseg.data import Case, DataError, check_cases, discover_cases, resolve_settings
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


def test_check_cases_reports_every_problem_in_one_error(tmp_path):
    good_img = tiny(5)
    good_img[0, 0, 0] = -1000  # air, as in every CT
    good_lab = tiny(1, dtype=np.uint8)
    cases, expected = [], {}

    def case(name, img=good_img, lab=good_lab, modality="CT", affine=None, lab_affine=None, ext=".nii.gz"):
        image = tmp_path / f"{name}{ext}"
        label = tmp_path / f"{name}_gt{ext}"
        if img is not None:
            write_nifti(image, img, affine)
        if lab is not None:
            write_nifti(label, lab, lab_affine if lab_affine is not None else affine)
        cases.append(Case(name, image, label, modality))
        return image, label

    img, lab = case("missing_label", lab=None)
    expected["missing_label"] = (lab, "missing label")
    img, lab = case("missing_image", img=None)
    expected["missing_image"] = (img, "missing image")
    img, lab = case("truncated", img=np.random.default_rng(0).integers(0, 999, (8, 8, 8)).astype(np.int16))
    blob = img.read_bytes()
    img.write_bytes(blob[: len(blob) // 2])
    expected["truncated"] = (img, "truncated")
    img, lab = case("garbage")
    lab.write_bytes(b"this is not a nifti file")
    expected["garbage"] = (lab, "unreadable or truncated label")
    img, lab = case("shape", lab=tiny(1, (8, 8, 7), np.uint8))
    expected["shape"] = (lab, "shape (8, 8, 7) differs")
    img, lab = case("float_label", lab=np.full((8, 8, 8), 1.5, np.float32))
    expected["float_label"] = (lab, "not integers")
    img, lab = case("unmapped", lab=tiny(205, dtype=np.int16) * np.eye(8, dtype=np.int16)[:, :, None] + 3)
    expected["unmapped"] = (lab, "[3, 208] are not in the label map")
    img, lab = case("too_many_classes", lab=tiny(420, dtype=np.int16))
    expected["too_many_classes"] = (lab, "[2] >= num_classes=2")
    nan_img = tiny(0, dtype=np.float32)
    nan_img[1, 2, 3], nan_img[0, 0, 0] = np.nan, np.inf
    img, lab = case("nan", img=nan_img)
    expected["nan"] = (img, "2 NaN/Inf voxels")
    img, lab = case("flat", img=np.zeros((8, 8), np.int16), lab=np.zeros((8, 8), np.uint8))
    expected["flat"] = (img, "is 2D")
    img, lab = case("four_d", img=np.zeros((8, 8, 8, 2), np.int16))
    expected["four_d"] = (img, "is 4D")
    img, lab = case("pet", modality="PET", ext=".nii")
    expected["pet"] = (img, "unknown modality 'PET'")
    img, lab = case("rgb", img=np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))
    expected["rgb"] = (img, "voxels are of type")
    img, lab = case("collapsed")
    with_sform(img, np.diag([1.0, 1.0, 0.0, 1.0]))
    expected["collapsed"] = (img, "affine is degenerate")
    nan_affine = np.eye(4)
    nan_affine[0, 0] = np.nan
    img, lab = case("nan_affine")
    with_sform(img, nan_affine)
    expected["nan_affine"] = (img, "affine has NaN or infinite entries")
    drift = np.eye(4)
    drift[0, 3] = 0.5
    img, lab = case("drift", lab_affine=drift)  # warning only
    img, lab = case("label_nan_affine")  # warning only: voxels correspond
    with_sform(lab, nan_affine)

    label_map = {205: 1, 420: 2, 1: 1}
    with pytest.raises(DataError) as err:
        check_cases(cases, label_map=label_map, num_classes=2, modalities=("CT", "MR"))
    problems = err.value.problems
    assert len(problems) == len(expected) + 1  # flat: image and label are both 2D
    for name, (path, text) in expected.items():
        hits = [p for p in problems if p.startswith(f"{path}:") and text in p]
        assert len(hits) == 1, (name, text, problems)
    assert f"{len(problems)} data problem(s)" in str(err.value)

    good = [c for c in cases if c.id in ("drift", "pet", "label_nan_affine")]
    warnings = check_cases(good, label_map=label_map, num_classes=2)
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{tmp_path / 'drift_gt.nii.gz'}: affine differs from the image's by up to 0.5")
    assert warnings[1] == (f"{tmp_path / 'label_nan_affine_gt.nii.gz'}: its affine has NaN or infinite entries; "
                           f"its voxels are taken to be the image's ({tmp_path / 'label_nan_affine.nii.gz'})")
    assert check_cases(good, label_map=label_map, affine_tol=1.0) == warnings[1:]


def test_swapped_modalities_and_images_given_as_labels_are_named(tmp_path):
    ct, mr = discover_cases(SAMPLE / "ct", "CT"), discover_cases(SAMPLE / "mr", "MR")
    assert check_cases(ct + mr) == []
    as_mr = [Case(c.id, c.image, c.label, "MR") for c in ct]
    as_ct = [Case(c.id, c.image, c.label, "CT") for c in mr]
    assert check_cases(as_mr + as_ct) == [
        f"{ct[0].image}: given as MR, but it has values down to -1207, like the air of a CT in HU; is it a CT "
        "(swapped --ct_dir/--mr_dir, or the wrong --modality)?",
        f"{mr[0].image}: given as CT, but its lowest value is -47, where a CT in HU has air near -1000; is it an MR "
        "(swapped --ct_dir/--mr_dir, or the wrong --modality)?",
    ]
    # The CT as its own label: one short line, not thousands of values.
    with pytest.raises(DataError) as err:
        check_cases([Case("swapped", ct[0].image, ct[0].image, "CT")], num_classes=14)
    (problem,) = err.value.problems
    assert problem.startswith(f"{ct[0].image}: label values ") and len(problem) < 400
    assert " values from -1207 to " in problem and "is it an image rather than a label map?" in problem


def test_check_cases_reads_scaled_images_as_stored(tmp_path, monkeypatch):
    # CT files often carry scl_inter -1024: the check reads the stored int16 voxels, not float64 copies.
    scaled = nib.Nifti1Image(np.arange(512, dtype=np.int16).reshape(8, 8, 8), np.eye(4))
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, tmp_path / "ct.nii.gz")
    floats = np.ones((8, 8, 8), np.float32)
    floats[1, 2, 3] = np.nan
    with_nan = nib.Nifti1Image(floats, np.eye(4))
    with_nan.header.set_slope_inter(2.0, 1.0)
    nib.save(with_nan, tmp_path / "nan.nii.gz")
    read = []
    original = nib.arrayproxy.ArrayProxy.get_unscaled
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", lambda self: read.append(original(self)) or read[-1])
    assert check_cases([Case("ct", tmp_path / "ct.nii.gz", None, "CT")]) == []
    assert read[0].dtype == np.int16
    with pytest.raises(DataError, match="1 NaN/Inf voxels in the image"):
        check_cases([Case("nan", tmp_path / "nan.nii.gz", None, "CT")])
    # Finite stored values that the header's scaling takes beyond float32 (preprocessing's type).
    huge = nib.Nifti1Image(np.full((8, 8, 8), 1e5, np.float64), np.eye(4))
    huge.header.set_slope_inter(1e36, 0.0)
    nib.save(huge, tmp_path / "huge.nii.gz")
    with pytest.raises(DataError, match=r"huge.nii.gz: values reach 1e\+41..1e\+41 after the header's scaling"):
        check_cases([Case("huge", tmp_path / "huge.nii.gz", None, "CT")])


def test_check_cases_duplicates_and_required_labels(tmp_path):
    img = write_nifti(tmp_path / "x.nii.gz", tiny())
    cases = [Case("x", img, None, "CT"), Case("x", img, None, "CT")]
    with pytest.raises(DataError) as err:
        check_cases(cases, require_labels=True)
    assert sum("duplicate case id 'x'" in p for p in err.value.problems) == 2
    assert sum("no label file" in p for p in err.value.problems) == 2
    with pytest.raises(DataError, match="no cases"):
        check_cases([])
