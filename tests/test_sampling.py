"""mulmodseg.data.sampling: crop centres, augmentation (warp, left/right mirror, intensity), determinism, collate."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mulmodseg.data import CropDataset, collate_crops


def _block_volume(size=40, lo=17, hi=23):
    image = np.ones((size,) * 3, np.float32)
    label = np.zeros((size,) * 3, np.uint8)
    label[lo:hi, lo:hi, lo:hi] = 3
    return image, label


def test_crop_positive_ratio_over_many_draws():
    ds = CropDataset([_block_volume()], roi_size=(8, 8, 8), num_samples=4, aug_prob=0.0, seed=5)
    centre_labels, flags = [], []
    for epoch in range(300):
        ds.set_epoch(epoch)
        item = ds[0]
        centre_labels += item["label"][:, 0, 4, 4, 4].tolist()
        flags += ds.draw_centres(0, ds.generator(0))[1].tolist()
    positive = np.mean(np.array(centre_labels) > 0)
    assert abs(positive - 0.5) < 0.05
    assert np.array_equal(np.array(centre_labels) > 0, np.array(flags))
    only_pos = CropDataset([_block_volume()], (8, 8, 8), num_samples=16, pos_fraction=1.0, aug_prob=0.0)
    assert np.all(only_pos[0]["label"][:, 0, 4, 4, 4].numpy() == 3)
    image, label = _block_volume()
    image[:, :, 30:] = 0  # not foreground: never a negative centre
    only_neg = CropDataset([(image, label)], (8, 8, 8), num_samples=64, pos_fraction=0.0)
    centres, positive_flags = only_neg.draw_centres(0, only_neg.generator(0))
    assert not positive_flags.any() and centres[:, 2].max() < 30
    assert np.all(label[tuple(centres.T)] == 0)


def test_class_balanced_centres_show_a_small_organ_as_often_as_a_large_one():
    """A 1000-voxel organ beside an 8-voxel one: uniform labelled voxels centre 8/1008 of the positive
    crops on the small one; class-balanced centres half of them."""
    image = np.ones((40, 40, 40), np.float32)
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:15, 5:15, 5:15] = 6
    label[30:32, 30:32, 30:32] = 11
    shares = {}
    for centres in ("voxel", "class"):
        ds = CropDataset([(image, label)], (8, 8, 8), num_samples=50, pos_fraction=1.0, positive_centres=centres)
        hits = []
        for epoch in range(40):
            ds.set_epoch(epoch)
            picked, _ = ds.draw_centres(0, ds.generator(0))
            hits += label[tuple(picked.T)].tolist()
        assert set(hits) <= {6, 11}  # every positive centre is a labelled voxel
        shares[centres] = np.mean(np.array(hits) == 11)
    assert shares["voxel"] < 0.03
    assert abs(shares["class"] - 0.5) < 0.05
    with pytest.raises(ValueError, match="positive_centres"):
        CropDataset([(image, label)], positive_centres="organ")
    empty = CropDataset([(image, np.zeros_like(label))], (8, 8, 8), num_samples=3, positive_centres="class")
    assert not empty.draw_centres(0, empty.generator(0))[1].any()  # no labelled voxel: negatives, no error


def test_a_left_right_mirror_keeps_the_classes():
    """Right kidney (2, image value 1) and left kidney (3, value 2): mirrored or not, each organ keeps its class
    (as nnU-Net: the anatomy around it, not the side of the crop it lands on, says which kidney it is)."""
    image = np.zeros((16, 8, 8), np.float32)
    label = np.zeros((16, 8, 8), np.uint8)
    image[2:5, 2:6, 2:6], label[2:5, 2:6, 2:6] = 1.0, 2
    image[10:14, 2:6, 2:6], label[10:14, 2:6, 2:6] = 2.0, 3
    ds = CropDataset([(image, label)], (16, 8, 8), num_samples=1, aug_prob=0.0, flip=(0, 1))
    mirrored = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[0]
        img, lab = item["image"][0, 0].numpy(), item["label"][0, 0].numpy()
        assert np.array_equal(np.unique(img[lab == 2]), [1.0]) and np.array_equal(np.unique(img[lab == 3]), [2.0])
        mirrored.add(bool(img[:8].max() == 2.0))  # the value-2 organ moved to the low-x side
    assert mirrored == {True, False}


def test_crop_fallback_when_no_labelled_voxel():
    image = np.ones((12, 12, 12), np.float32)
    ds = CropDataset([(image, np.zeros_like(image, np.uint8))], (8, 8, 8), num_samples=6, pos_fraction=1.0)
    _, positive = ds.draw_centres(0, ds.generator(0))
    assert not positive.any() and ds[0]["image"].shape == (6, 1, 8, 8, 8)


def test_crop_content_determinism_and_workers():
    rng = np.random.default_rng(0)
    volumes = [(rng.random((20, 18, 16)).astype(np.float32), (rng.random((20, 18, 16)) > 0.8).astype(np.uint8))
               for _ in range(4)]
    ds = CropDataset(volumes, (8, 8, 8), num_samples=2, aug_prob=0.0, seed=11, modality="MR")
    item = ds[2]
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert item["image"].shape == (2, 1, 8, 8, 8) and item["modality"] == "MR"
    # Without augmentation a crop is an exact window of the volume, centred on its drawn centre.
    centres, _ = ds.draw_centres(2, ds.generator(2))
    for k, centre in enumerate(centres):
        start = np.clip(centre - 4, 0, np.array([20, 18, 16]) - 8)
        window = tuple(slice(s, s + 8) for s in start)
        np.testing.assert_array_equal(item["image"][k, 0].numpy(), volumes[2][0][window])
        np.testing.assert_array_equal(item["label"][k, 0].numpy(), volumes[2][1][window])

    augmented = CropDataset(volumes, (8, 8, 8), seed=11, rotate_degrees=10, scale_range=0.1, flip=(1, 2))
    first = [augmented[i]["image"] for i in range(4)]
    loader = torch.utils.data.DataLoader(CropDataset(volumes, (8, 8, 8), seed=11, rotate_degrees=10,
                                                     scale_range=0.1, flip=(1, 2)),
                                         batch_size=2, num_workers=2, collate_fn=collate_crops)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 1, 8, 8, 8)] * 2
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.cat(first))
    augmented.set_epoch(1)
    assert not torch.equal(augmented[0]["image"], first[0])
    augmented.set_epoch(0)
    assert torch.equal(augmented[0]["image"], first[0])
    other_seed = CropDataset(volumes, (8, 8, 8), seed=12, rotate_degrees=10, scale_range=0.1, flip=(1, 2))
    assert not torch.equal(other_seed[0]["image"], first[0])


def test_intensity_augmentation_bounds_and_collate_modality():
    image = np.full((10, 10, 10), 0.5, np.float32)
    label = np.ones((10, 10, 10), np.uint8)
    ds = CropDataset([(image, label)], (10, 10, 10), num_samples=50, aug_prob=0.5, seed=3, modality="CT")
    crops = ds[0]["image"][:, 0]
    per_crop = crops.reshape(50, -1)
    assert torch.all(per_crop.max(1).values == per_crop.min(1).values)  # one scale/shift per crop
    values = per_crop[:, 0]
    assert values.min() >= 0.5 * 0.9 - 0.1 - 1e-6 and values.max() <= 0.5 * 1.1 + 0.1 + 1e-6
    changed = np.mean(np.abs(values.numpy() - 0.5) > 1e-7)
    assert 0.5 < changed < 0.95  # 1 - 0.5 * 0.5 = 0.75 of the crops are altered
    batch = collate_crops([ds[0], ds[0]])
    assert batch["image"].shape == (100, 1, 10, 10, 10) and batch["modality"] == ["CT"] * 100


def grid_sample_warp(image, label, angle, scales):
    """Oracle: the 3D grid of source positions through torch's trilinear / nearest grid_sample."""
    shape = image.shape
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(scales)
    centre = (np.array(shape) - 1) / 2.0
    offsets = np.stack(np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij"), -1)
    source = offsets @ matrix.T + centre
    grid = torch.from_numpy(2.0 * source / np.maximum(np.array(shape) - 1, 1) - 1.0).flip(-1).float()[None]
    kw = dict(padding_mode="reflection", align_corners=True)
    img = F.grid_sample(torch.from_numpy(image)[None, None], grid, mode="bilinear", **kw)[0, 0].numpy()
    lab = F.grid_sample(torch.from_numpy(label).double()[None, None], grid.double(), mode="nearest", **kw)
    return img, lab[0, 0].round().long().numpy()


@pytest.mark.parametrize("shape, seed", [((33, 40, 17), 0), ((24, 24, 24), 1), ((16, 9, 5), 2), ((12, 10, 1), 3)])
def test_warp_equals_3d_grid_sample(shape, seed):
    from mulmodseg.data.sampling import warp
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    label = rng.integers(0, 14, shape)
    for _ in range(4):  # large angles and scales, so that reflection at the borders is exercised
        angle, scales = rng.uniform(-1.2, 1.2), rng.uniform(0.6, 1.4, size=3)
        img, lab = warp(image, label, angle, scales)
        ref_img, ref_lab = grid_sample_warp(image, label, angle, scales)
        assert img.dtype == np.float32 and img.shape == shape and lab.shape == shape
        np.testing.assert_allclose(img, ref_img, atol=2e-5)
        np.testing.assert_array_equal(lab, ref_lab)


def test_warp_identity_and_quarter_turn():
    from mulmodseg.data.sampling import warp
    rng = np.random.default_rng(1)
    image = rng.random((9, 9, 5)).astype(np.float32)
    label = rng.integers(0, 4, (9, 9, 5))
    same_image, same_label = warp(image, label, 0.0, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(same_image, image, atol=1e-5)
    np.testing.assert_array_equal(same_label, label)
    turned_image, turned_label = warp(image, label, np.pi / 2, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(turned_image, np.rot90(image, -1, axes=(0, 1)), atol=1e-5)
    np.testing.assert_array_equal(turned_label, np.rot90(label, -1, axes=(0, 1)))


@pytest.mark.parametrize("warp_prob, low, high", [(1.0, 1.0, 1.0), (0.5, 0.35, 0.65), (0.0, 0.0, 0.0)])
def test_warp_prob_is_the_share_of_warped_crops(warp_prob, low, high):
    # The crop is the whole volume and intensity augmentation is off, so a crop differs only when warped.
    rng = np.random.default_rng(0)
    image = rng.random((12, 12, 6)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    ds = CropDataset([(image, label)], (12, 12, 6), num_samples=60, aug_prob=0.0, rotate_degrees=10,
                     scale_range=0.1, warp_prob=warp_prob, seed=4)
    crops = ds[0]["image"][:, 0].numpy()
    warped = np.mean([not np.allclose(c, image) for c in crops])
    assert low <= warped <= high


def test_view_box_holds_the_centre_and_draws_every_allowed_length():
    from mulmodseg.data.sampling import view_box
    rng = np.random.default_rng(0)
    lengths, starts = [], []
    for _ in range(2000):
        box = view_box((20, 10, 5), 0.2, rng)
        for axis, (s, n) in enumerate(zip(box, (20, 10, 5))):
            assert s.start <= n // 2 < s.stop <= n and s.stop - s.start >= int(np.ceil(0.2 * n))
        lengths.append(box[0].stop - box[0].start)
        starts.append(box[0].start)
    assert set(lengths) == set(range(4, 21)) and set(starts) == set(range(0, 11))  # 4..20 voxels; centre 10 inside
    assert view_box((8, 8, 8), 1.0, rng) == (slice(0, 8),) * 3


def test_limit_view_keeps_the_box_and_fills_the_rest_with_image_0_and_background():
    from mulmodseg.data.sampling import limit_view
    image = np.arange(1, 4 * 5 * 6 + 1, dtype=np.float32).reshape(4, 5, 6)
    label = np.full((4, 5, 6), 2, np.int64)
    box = (slice(1, 3), slice(0, 5), slice(2, 4))
    kept_image, kept_label = limit_view(image, label, box)
    inside = np.zeros((4, 5, 6), bool)
    inside[box] = True
    np.testing.assert_array_equal(kept_image[inside], image[inside])
    assert np.all(kept_image[~inside] == 0) and np.all(kept_label[~inside] == 0) and np.all(kept_label[inside] == 2)
    assert image.min() == 1 and label.min() == 2  # the inputs are left as they were


@pytest.mark.parametrize("fov_prob, low, high", [(0.3, 0.22, 0.38), (1.0, 1.0, 1.0)])
def test_fov_prob_is_the_share_of_crops_cut_to_a_box_around_their_centre(fov_prob, low, high):
    # Image 1 everywhere and intensity augmentation off: a limited crop is the one with zeros, inside one box.
    ds = CropDataset([_block_volume(24, 10, 14)], (24, 24, 24), num_samples=200, aug_prob=0.0, seed=3,
                     fov_prob=fov_prob, fov_min=0.25)
    item = ds[0]
    images, labels = item["image"][:, 0].numpy(), item["label"][:, 0].numpy()
    limited = np.array([(im == 0).any() for im in images])
    assert low <= limited.mean() <= high
    for im, lab in zip(images[limited], labels[limited]):
        kept = np.argwhere(im == 1)
        low_corner, high_corner = kept.min(0), kept.max(0) + 1
        assert len(kept) == np.prod(high_corner - low_corner)  # one box
        assert np.all(low_corner <= 12) and np.all(high_corner > 12) and np.all(high_corner - low_corner >= 6)
        assert not lab[im == 0].any()  # no label outside the view
    again = CropDataset([_block_volume(24, 10, 14)], (24, 24, 24), num_samples=200, aug_prob=0.0, seed=3,
                        fov_prob=fov_prob, fov_min=0.25)[0]
    assert torch.equal(again["image"], item["image"]) and torch.equal(again["label"], item["label"])


def test_remap_intensity_is_the_piecewise_linear_curve_through_its_levels():
    from mulmodseg.data.sampling import remap_intensity
    levels = np.array([0.2, 1.0, 0.0, 0.5, 0.5, 0.9])  # at 0, 0.2, 0.4, 0.6, 0.8, 1
    image = np.array([0.0, 0.2, 0.3, 0.4, 0.7, 1.0, -0.5, 1.5], np.float32).reshape(2, 2, 2)
    out = remap_intensity(image, levels)
    np.testing.assert_allclose(out.ravel(), [0.2, 1.0, 0.5, 0.0, 0.5, 0.9, 0.2, 0.9], atol=1e-6)
    assert out.dtype == np.float32 and image[0, 0, 0] == 0.0  # a new array; the input as it was


@pytest.mark.parametrize("remap_prob, low, high", [(0.3, 0.22, 0.38), (1.0, 1.0, 1.0)])
def test_remap_prob_is_the_share_of_crops_whose_intensities_go_through_one_curve(remap_prob, low, high):
    # Crops of a ramp, scale/shift off: a remapped crop differs from the plain one, and equal inputs stay equal.
    ramp = np.broadcast_to(np.linspace(0, 1, 24, dtype=np.float32)[:, None, None], (24, 24, 24)).copy()
    volume = (ramp, (ramp > 0.5).astype(np.int64))
    plain = CropDataset([volume], (16, 16, 16), num_samples=200, aug_prob=0.0, seed=4)[0]
    item = CropDataset([volume], (16, 16, 16), num_samples=200, aug_prob=0.0, seed=4, remap_prob=remap_prob)[0]
    assert torch.equal(item["label"], plain["label"])  # centres drawn first: the same crops, labels untouched
    images, before = item["image"][:, 0].numpy(), plain["image"][:, 0].numpy()
    remapped = np.array([not np.array_equal(a, b) for a, b in zip(images, before)])
    assert low <= remapped.mean() <= high
    for a, b in zip(images[remapped], before[remapped]):
        for value in np.unique(b):
            assert np.ptp(a[b == value]) == 0  # one curve for the whole crop
        assert 0.0 <= a.min() and a.max() <= 1.0
    again = CropDataset([volume], (16, 16, 16), num_samples=200, aug_prob=0.0, seed=4, remap_prob=remap_prob)[0]
    assert torch.equal(again["image"], item["image"])
    with pytest.raises(ValueError, match="remap_prob must be in"):
        CropDataset([volume], (16, 16, 16), remap_prob=-0.5)


def test_fov_off_draws_nothing_so_runs_before_it_replay_their_crops():
    volume = _block_volume()
    before = CropDataset([volume], (16, 16, 16), num_samples=6, rotate_degrees=6, scale_range=0.1, seed=2)[0]
    off = CropDataset([volume], (16, 16, 16), num_samples=6, rotate_degrees=6, scale_range=0.1, seed=2,
                      fov_prob=0.0, fov_min=0.5, remap_prob=0.0)[0]
    assert torch.equal(before["image"], off["image"]) and torch.equal(before["label"], off["label"])
    with pytest.raises(ValueError, match="fov_prob must be in"):
        CropDataset([volume], (16, 16, 16), fov_prob=1.5)


@pytest.mark.parametrize("shape", [(40, 40, 40), (20, 13, 30)])
def test_a_cut_with_a_margin_is_the_roi_crop_grown_with_zeros_beyond_the_volume(shape):
    """The larger crops cut for `augment.augment_batch` hold, at their centre, the very roi crop a dataset without
    a margin cuts (a volume's edge, shorter axes), and image 0 / background beyond the volume: they once started
    inside the volume, so on a volume shorter than the cut every crop sat at its middle whatever its centre."""
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32) + 0.5
    label = rng.integers(0, 3, shape).astype(np.uint8)
    roi, cut = (16, 16, 16), (30, 26, 16)
    plain = CropDataset([(image, label)], roi, num_samples=8, aug_prob=0.0, seed=3)
    grown = CropDataset([(image, label)], roi, num_samples=8, aug_prob=0.0, seed=3, cut_size=cut)
    margin = [(c - r) // 2 for c, r in zip(cut, roi)]
    centre = (slice(None), slice(None), *(slice(m, m + r) for m, r in zip(margin, roi)))
    for epoch in range(6):
        plain.set_epoch(epoch)
        grown.set_epoch(epoch)
        a, b = plain[0], grown[0]
        assert b["image"].shape == (8, 1, *cut)
        assert torch.equal(b["image"][centre], a["image"]) and torch.equal(b["label"][centre], a["label"])
    # every value of the cut comes from the volume or is 0; volume voxels keep their place around the roi crop
    grown.set_epoch(0)
    centres, _ = grown.draw_centres(0, grown.generator(0))
    k_start = np.clip(centres[0] - 8, 0, np.maximum(np.array(shape) - 16, 0))
    k_start = np.where(np.array(shape) < 16, -((16 - np.array(shape)) // 2), k_start) - margin
    expected = np.zeros(cut, np.float32)
    src = tuple(slice(max(s, 0), min(s + c, n)) for s, c, n in zip(k_start, cut, shape))
    dst = tuple(slice(max(s, 0) - s, min(s + c, n) - s) for s, c, n in zip(k_start, cut, shape))
    expected[dst] = image[src]
    assert np.array_equal(grown[0]["image"][0, 0].numpy(), expected)
    with pytest.raises(ValueError, match="even margin"):
        CropDataset([(image, label)], roi, cut_size=(17, 16, 16))


def test_a_limited_view_of_a_cut_with_a_margin_is_drawn_on_its_centre_roi_crop():
    """With fov_prob 1, what a margin-cut crop keeps lies inside its centre roi window, and it is the very view a
    dataset without a margin keeps (same draws)."""
    image, label = _block_volume()
    plain = CropDataset([(image, label)], (16, 16, 16), num_samples=6, aug_prob=0.0, fov_prob=1.0, fov_min=0.3, seed=2)
    grown = CropDataset([(image, label)], (16, 16, 16), num_samples=6, aug_prob=0.0, fov_prob=1.0, fov_min=0.3, seed=2,
                        cut_size=(24, 20, 16))
    a, b = plain[0], grown[0]
    centre = (slice(None), slice(None), slice(4, 20), slice(2, 18), slice(0, 16))
    assert torch.equal(b["image"][centre], a["image"]) and torch.equal(b["label"][centre], a["label"])
    assert b["image"].sum() == a["image"].sum() < a["image"].numel()  # nothing kept outside the centre window
