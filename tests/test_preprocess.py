"""mulmodseg.data.preprocess: the training grid and intensities, restoring onto the scan, and refusing bad input."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SAMPLE, tiny, with_sform, write_nifti

from mulmodseg.data import (
    Case,
    DataError,
    check_cases,
    default_settings,
    discover_cases,
    load_volume,
    preprocess,
    resolve_settings,
    restore,
    restore_argmax,
)
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


def dice_per_class(a, b):
    return {int(k): 2.0 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
            for k in np.unique(b) if k != 0}


def test_a_label_stored_in_another_axis_order_lands_on_its_image(tmp_path):
    """The bundled CT's label saved as I, R, P (axes permuted and flipped, same world content) gives
    the training label of the label saved like its image, passes the check without a warning, and the
    shape check compares the label on the image's axes."""
    ct = nib.load(str(SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz"))
    lab = nib.load(str(SAMPLE / "ct" / "labelsTr" / "ts_ct_001.nii.gz"))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(lab.affine),
                                                [[2, -1], [0, 1], [1, -1]])
    moved = lab.as_reoriented(transform)
    assert nib.aff2axcodes(moved.affine) == ("I", "R", "P") and moved.shape == (112, 122, 101)
    nib.save(moved, str(tmp_path / "irp.nii.gz"))
    _, expected, _ = preprocess(ct, lab, "CT")
    _, got, _ = preprocess(ct, tmp_path / "irp.nii.gz", "CT")
    assert np.array_equal(got, expected) and expected.max() == 13
    assert check_cases([Case("ts_ct_001", SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz",
                             tmp_path / "irp.nii.gz", "CT")], num_classes=14) == []
    # Same axes as the image, wrong shape: still a shape problem, named with the label's file.
    write_nifti(tmp_path / "short.nii.gz", np.zeros((122, 101, 111), np.uint8), ct.affine)
    with pytest.raises(DataError, match=r"short.nii.gz: label shape \(122, 101, 111\) differs from image shape"):
        check_cases([Case("x", SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz", tmp_path / "short.nii.gz", "CT")])


def test_preprocess_names_the_file_for_unreadable_input_and_a_degenerate_affine(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match=f"{garbage}: unreadable"):
        preprocess(garbage, modality="CT")
    noise = np.random.default_rng(0).integers(0, 999, (16, 16, 16)).astype(np.int16)
    truncated = write_nifti(tmp_path / "truncated.nii.gz", noise)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: unreadable or truncated data"):
        preprocess(truncated, modality="CT")
    flat = write_nifti(tmp_path / "flat.nii.gz", tiny(5))
    with_sform(flat, np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(DataError, match=f"{flat}: its affine is degenerate"):
        preprocess(flat, modality="CT")


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_real_round_trip_dice(modality):
    folder = SAMPLE / modality.lower()
    case = discover_cases(folder, modality)[0]
    original = np.asanyarray(nib.load(str(case.label)).dataobj)
    image, label, meta = preprocess(case.image, case.label, modality)
    assert json.loads(json.dumps(meta)) == meta
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
    assert all(n >= 96 for n in image.shape)
    assert image.min() == 0.0 and image.max() == 1.0
    np.testing.assert_allclose(meta["spacing"], [1.5, 1.5, 2.0], rtol=1e-6)
    affine = np.asarray(meta["affine"])
    np.testing.assert_allclose(np.abs(affine[:3, :3]), np.diag([1.5, 1.5, 2.0]), atol=1e-6)
    assert np.all(np.diag(affine)[:3] > 0)  # RAS array order
    assert sorted(np.unique(label)) == sorted(np.unique(original))

    back = restore(label, meta)
    assert back.shape == original.shape and back.dtype == np.uint8
    dice = dice_per_class(back, original)
    assert len(dice) == 12 and min(dice.values()) >= 0.95
    assert np.mean(back == original) == 1.0  # the training grid is finer: nearest round trip is exact

    classes = [0, 1, 2, 6, 10]  # background, spleen, right kidney, liver, pancreas
    onehot = np.stack([label == k for k in classes]).astype(np.float32)
    probs = restore(onehot, meta, "linear")
    assert probs.shape == (len(classes),) + original.shape and probs.dtype == np.float32
    predicted = np.asarray(classes)[probs.argmax(0)]
    masked = np.where(np.isin(original, classes), original, 0)
    assert min(dice_per_class(predicted, masked).values()) >= 0.95
    # Channel by channel with a running argmax: the same labels.
    labels = restore_argmax(onehot, meta)
    assert labels.dtype == np.uint8 and np.array_equal(np.asarray(classes)[labels], predicted)

    # Same image without a label: same array (labels lie inside the body box here).
    alone, none, meta_alone = preprocess(case.image, modality=modality)
    assert none is None and np.array_equal(alone, image)


@pytest.mark.parametrize("radius,nearest_at_most,scores_at_least", [(4.0, 0.87, 0.935), (6.0, 0.91, 0.965),
                                                                     (10.0, 0.95, 0.99)])
def test_restoring_scores_keeps_small_structures(tmp_path, radius, nearest_at_most, scores_at_least):
    """A sphere on a 0.75 x 0.75 x 3 mm scan, trained at 1.5 x 1.5 x 2 mm, with perfect scores there (the
    signed distance to its surface): the argmax of the linearly restored scores is nearly the sphere,
    the nearest-neighbour restored training-space label is blocky (the old path)."""
    shape, spacing = (64, 64, 16), (0.75, 0.75, 3.0)
    centre = np.array([24.2, 23.9, 24.1])  # mm, off the voxel grids
    affine = np.diag([*spacing, 1.0])
    world = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    truth = (np.linalg.norm(world - centre, axis=-1) < radius).astype(np.uint8)
    path = write_nifti(tmp_path / "scan.nii.gz", np.full(shape, 100, np.int16), affine)
    _, _, meta = preprocess(path, modality="MR", spacing=[1.5, 1.5, 2.0], min_size=None, crop_foreground=False)
    train_affine = np.asarray(meta["affine"])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in meta["shape"]], indexing="ij"), -1)
    train_world = grid @ train_affine[:3, :3].T + train_affine[:3, 3]
    inside = radius - np.linalg.norm(train_world - centre, axis=-1)  # > 0 inside the sphere
    scores = np.stack([np.zeros_like(inside), inside]).astype(np.float32)
    from_scores = restore_argmax(scores, meta)
    from_label = restore((inside > 0).astype(np.uint8), meta)
    assert dice_per_class(from_label, truth)[1] <= nearest_at_most
    assert dice_per_class(from_scores, truth)[1] >= scores_at_least


def test_restore_argmax_in_slabs_equals_the_argmax_of_restored_channels():
    rng = np.random.default_rng(0)
    data = np.zeros((30, 26, 12), np.float32)
    data[4:25, 3:20, 2:11] = rng.random((21, 17, 9)) + 1  # a foreground box: voxels outside it are background
    affine = np.array([[0, -1.1, 0, 5], [-0.8, 0, 0, 3], [0, 0, 3.0, -7], [0, 0, 0, 1]])  # not RAS, anisotropic
    meta = preprocess(nib.Nifti1Image(data, affine), modality="MR", spacing=[1.3, 0.9, 2.5], min_size=[20, 20, 20])[2]
    scores = rng.random((4, *meta["shape"])).astype(np.float32)
    expected = restore(scores, meta, "linear", fill=-1.0)
    expected[0][expected[0] == -1.0] = 2.0  # outside the crop box: background
    expected = expected.argmax(0)
    for planes in (1, 5, 16, 1000):
        assert np.array_equal(restore_argmax(scores, meta, planes=planes), expected)


def test_ct_window_values_and_mr_percentiles(tmp_path):
    hu = np.array([-1000, -125, 75, 275, 1000], dtype=np.int16)
    ct = write_nifti(tmp_path / "ct.nii.gz", np.broadcast_to(hu[:, None, None], (5, 4, 4)), np.diag([1.5, 1.5, 2, 1]))
    image, _, meta = preprocess(ct, modality="CT", crop_foreground=False, min_size=None)
    np.testing.assert_allclose(image[:, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert meta["intensity"]["clip"] == [-125.0, 275.0]
    rng = np.random.default_rng(0)
    mr = write_nifti(tmp_path / "mr.nii.gz", rng.normal(300, 50, (30, 30, 20)).astype(np.float32),
                     np.diag([1.5, 1.5, 2, 1]))
    image, _, meta = preprocess(mr, modality="MR", crop_foreground=False, min_size=None)
    assert image.min() == 0.0 and image.max() == 1.0
    assert 0.004 <= np.mean(image == 0.0) <= 0.006 and 0.004 <= np.mean(image == 1.0) <= 0.006
    low, high = meta["intensity"]["clip"]
    assert 150 < low < 200 and 400 < high < 450
    # Any other modality follows MR; a window overrides the percentiles.
    assert default_settings("PET")["percentiles"] == [0.5, 99.5] and default_settings("PET")["window"] is None
    image, _, meta = preprocess(mr, modality="MR", window=(0, 600), crop_foreground=False, min_size=None)
    assert meta["intensity"]["clip"] == [0.0, 600.0]
    with pytest.raises(TypeError, match="unknown preprocessing settings"):
        preprocess(mr, modality="MR", spacng=(1, 1, 1))


def _axcode_affine(codes, spacing, shape):
    """Affine whose axes run along `codes` (e.g. "LPS"), with some world offset."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for axis, code in enumerate(codes):
        world = "RAS".index(code) if code in "RAS" else "LPI".index(code)
        sign = 1 if code in "RAS" else -1
        affine[world, axis] = sign * spacing[axis]
        affine[world, 3] = -sign * spacing[axis] * (shape[axis] - 1) / 3 + 10 * world
    return affine


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "SLP"])
@pytest.mark.parametrize("at_target", [True, False])
def test_orientation_marker_keeps_world_position(tmp_path, codes, at_target):
    shape = (20, 14, 10)
    # at_target: R/L and A/P axes 1.5 mm, S/I 2.0 mm, so only flips, transposes, crop and pad happen.
    spacing = [2.0 if c in "SI" else 1.5 for c in codes] if at_target else [3.0, 3.0, 3.0]
    affine = _axcode_affine(codes, spacing, shape)
    assert "".join(nib.aff2axcodes(affine)) == codes
    img = np.full(shape, 100, np.int16)
    img[:2], img[-2:] = -1000, -1000  # air slabs on one axis: the crop must cut them
    lab = np.zeros(shape, np.uint8)
    marker = (5, 9, 3)
    lab[marker] = 1
    image_path = write_nifti(tmp_path / "img.nii.gz", img, affine)
    label_path = write_nifti(tmp_path / "lab.nii.gz", lab, affine)
    image, label, meta = preprocess(image_path, label_path, "CT", min_size=(16, 16, 16))
    train_affine = np.asarray(meta["affine"])
    assert "".join(nib.aff2axcodes(train_affine)) == "RAS"
    world = affine @ np.r_[marker, 1.0]
    hits = np.argwhere(label == 1)
    found = (train_affine @ np.c_[hits, np.ones(len(hits))].T).T[:, :3].mean(axis=0)
    if at_target:
        assert len(hits) == 1
        np.testing.assert_allclose(found, world[:3], atol=1e-9)
    else:  # 3 mm -> 1.5 x 1.5 x 2 mm: the marker spreads over 2 x 2 x 1-2 voxels around the same point
        assert 4 <= len(hits) <= 8
        assert np.all(np.abs(found - world[:3]) <= 0.5 * np.array([1.5, 1.5, 2.0]) + 1e-9)
    cropped = np.array(meta["crop_end"]) - np.array(meta["crop_start"])
    assert np.prod(cropped) < np.prod(meta["resampled_shape"])  # the air slabs were cropped away
    back = restore(label, meta)
    assert back.shape == shape
    assert np.argwhere(back == 1).tolist() == [list(marker)]
    restored_image = restore(image, meta, "linear")
    # (100 + 125) / 400 away from the air; body voxels next to it mix in some air (HU resampled, then windowed)
    np.testing.assert_allclose(restored_image[3:-3], 0.5625, atol=1e-6)
    assert np.all((restored_image[2:-2] > 0.2) & (restored_image[2:-2] <= 0.5625 + 1e-6))
    assert np.all(restored_image[img == -1000] == 0.0)


def test_preprocess_rejects_4d_and_restore_checks_shape(tmp_path):
    path = write_nifti(tmp_path / "x.nii.gz", np.zeros((8, 8, 8, 2), np.int16))
    with pytest.raises(DataError, match="expected a 3D volume") as err:
        preprocess(path)
    assert str(path) in err.value.problems[0]
    good = write_nifti(tmp_path / "y.nii.gz", tiny(100))
    _, _, meta = preprocess(good, min_size=None)
    with pytest.raises(ValueError):
        restore(np.zeros((3, 3, 3)), meta)


def test_a_trailing_axis_of_length_one_is_a_3d_volume(tmp_path):
    # (X, Y, Z, 1) files (a time or channel axis of one) are what some exporters write; ITK reads them
    # as 3D, and so do the checks, preprocess and read_label, with the same numbers as the 3D file.
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 300, (12, 10, 8)).astype(np.int16)
    label = (rng.random((12, 10, 8)) > 0.7).astype(np.uint8)
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 3.0, -5], [0, 2.5, 0, 7], [0, 0, 0, 1]])
    flat = Case("a", write_nifti(tmp_path / "3d" / "a.nii.gz", image, affine),
                write_nifti(tmp_path / "3d" / "a_gt.nii.gz", label, affine), "CT")
    extra = Case("a", write_nifti(tmp_path / "4d" / "a.nii.gz", image[..., None], affine),
                 write_nifti(tmp_path / "4d" / "a_gt.nii.gz", label[..., None, None], affine), "CT")
    assert check_cases([extra]) == []
    loaded = load_volume(extra.image)
    assert loaded.shape == (12, 10, 8) and np.array_equal(loaded.affine, affine)
    assert np.array_equal(np.asanyarray(loaded.dataobj), image)
    want_image, want_label, want_meta = preprocess(flat.image, flat.label, min_size=[8, 8, 8])
    got_image, got_label, got_meta = preprocess(extra.image, extra.label, min_size=[8, 8, 8])
    assert np.array_equal(got_image, want_image) and np.array_equal(got_label, want_label)
    assert got_meta["original_shape"] == [12, 10, 8] and got_meta["shape"] == want_meta["shape"]
    with pytest.raises(DataError, match="is 4D"):
        check_cases([Case("b", write_nifti(tmp_path / "b.nii.gz", np.zeros((8, 8, 8, 2), np.int16)), None, "CT")])
