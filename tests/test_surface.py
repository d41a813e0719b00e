"""Surfels, NSD and HD95 (DeepMind's surface-distance definition) on hand-made masks and against MONAI,
alone and per class through case_metrics.

The surfaces are DeepMind's surface-distance surfels. MONAI implements the same with use_subvoxels=True
(get_mask_edges with a spacing gives every cube's surfel area, compute_surface_dice the NSD): the oracle.
MONAI has no area-weighted HD95, so the tests weigh MONAI's surfel distances by MONAI's areas themselves.
"""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance
from scipy import ndimage

from mulmodseg.metrics import case_metrics, dice_per_class
from mulmodseg.surface import surface_area, surface_distances, surface_elements, surface_metrics, surfel_area_table


def _tensor(mask):
    return torch.as_tensor(np.ascontiguousarray(mask))


def _monai_nsd(pred, label, spacing, tolerance):
    p, t = _tensor(pred[None, None]).float(), _tensor(label[None, None]).float()
    return compute_surface_dice(p, t, [tolerance], include_background=True, spacing=list(spacing),
                                use_subvoxels=True).item()


def _weighted_percentile(distances, areas, percent=95.0):
    """The smallest distance at which the cumulative area share reaches percent % (DeepMind's rule)."""
    order = np.argsort(distances)
    share = np.cumsum(areas[order]) / areas.sum()
    return float(distances[order][min(np.searchsorted(share, percent / 100), len(order) - 1)])


def _monai_surfels(pred, label, spacing):
    """MONAI's surfel distances (pred -> label, label -> pred) and areas, float64."""
    edges_pred, edges_label, areas_pred, areas_label = get_mask_edges(_tensor(pred), _tensor(label), spacing=spacing)
    to_label = get_surface_distance(edges_pred, edges_label, spacing=spacing)
    to_pred = get_surface_distance(edges_label, edges_pred, spacing=spacing)
    as_numpy = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    return (as_numpy(to_label), as_numpy(areas_pred[edges_pred]), as_numpy(to_pred), as_numpy(areas_label[edges_label]))


def _monai_hd95(pred, label, spacing):
    to_label, areas_pred, to_pred, areas_label = _monai_surfels(pred, label, spacing)
    return max(_weighted_percentile(to_label, areas_pred), _weighted_percentile(to_pred, areas_label))


def _blobs(rng, shape, count=2):
    seeds = rng.random((count, *shape)) < 0.02
    return [ndimage.binary_dilation(s, iterations=int(rng.integers(1, 4))) for s in seeds]


def _box_area(dims, spacing):
    """The marching-cubes surface of an a x b x c box of voxels, by hand: on each face a flat rectangle
    through the outer voxel layer's half-way plane ((a-1)(b-1) cubes of area sx*sy on a z face, ...), along
    each of the 12 edges a chamfer strip (an x edge: a-1 cubes, each sx long and |(sy, sz)|/2 wide), and at
    the 8 corners a triangle with vertices half a voxel along each axis: area |(sy sz, sx sz, sx sy)|/8."""
    (a, b, c), (sx, sy, sz) = dims, spacing
    faces = 2 * ((b - 1) * (c - 1) * sy * sz + (a - 1) * (c - 1) * sx * sz + (a - 1) * (b - 1) * sx * sy)
    edges = 4 * ((a - 1) * sx * math.hypot(sy, sz) + (b - 1) * sy * math.hypot(sx, sz)
                 + (c - 1) * sz * math.hypot(sx, sy)) / 2
    corners = 8 * math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8
    return faces + edges + corners


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.9), (2.2, 0.45, 1.1)])
def test_surfel_areas_of_every_cube_configuration_match_monai(spacing):
    """Each of the 256 configurations of a 2x2x2 mask, zero-padded: all 27 cubes' areas equal MONAI's
    (the middle cube holds the configuration itself, the others parts of it)."""
    table = surfel_area_table(spacing)
    assert table[0] == 0 and table[255] == 0 and (table[1:255] > 0).all()
    np.testing.assert_allclose(table, table[::-1], rtol=1e-12)  # a code and its complement: the same surface
    for code in range(256):
        mask = np.array([code >> bit & 1 for bit in range(8)], dtype=bool).reshape(2, 2, 2)
        padded = _tensor(np.pad(mask, 1))
        edges, _, areas, _ = get_mask_edges(padded, padded, crop=False, spacing=spacing)
        np.testing.assert_allclose(surface_elements(mask, spacing), (areas * edges).numpy(), rtol=1e-6, atol=1e-7)


def test_surface_area_by_hand():
    # One voxel of sides (a, b, c) = (1, 2, 3) mm: its 8 corner cubes each hold the triangle with vertices at
    # (a/2, 0, 0), (0, b/2, 0), (0, 0, c/2) from the corner, area |(-a/2, b/2, 0) x (-a/2, 0, c/2)| / 2 =
    # |(bc, ac, ab)| / 8; the 8 of them: sqrt((bc)^2 + (ac)^2 + (ab)^2) = sqrt(36 + 9 + 4) = 7 mm^2.
    voxel = np.zeros((3, 3, 3), bool)
    voxel[1, 1, 1] = True
    assert surface_area(voxel, (1.0, 2.0, 3.0)) == pytest.approx(7.0)
    assert surface_area(voxel, (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(3))  # the octahedron of edge 1/sqrt(2)
    assert surface_area(np.zeros((3, 3, 3), bool), (1.0, 1.0, 1.0)) == 0.0
    # Boxes, anisotropic; a box at the array's edge is padded with background like any other.
    for dims, spacing in (((4, 4, 4), (0.5, 1.0, 1.0)), ((5, 3, 7), (0.8, 1.7, 2.5)), ((1, 6, 2), (1.0, 1.0, 3.0))):
        mask = np.zeros((9, 9, 9), bool)
        mask[2 : 2 + dims[0], 1 : 1 + dims[1], 0 : dims[2]] = True
        assert surface_area(mask, spacing) == pytest.approx(_box_area(dims, spacing), rel=1e-12)


def test_sphere_area_and_monai_totals():
    """A ball of radius 20 mm on a 48^3 grid (1 mm, then anisotropic voxels): the surfels' area is near
    4 pi r^2, 9 % and 12 % above it: marching cubes with edge-midpoint vertices on a binary mask
    overestimates curved or slanted surfaces (it is exact on faces along the axes, see the boxes above).
    That is the definition, as MONAI's total on the same masks shows."""
    for spacing, over in (((1.0, 1.0, 1.0), 1.093), ((1.0, 1.5, 2.0), 1.118)):
        axes = [(np.arange(48) - 23.5) * s for s in spacing]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        ball = x**2 + y**2 + z**2 <= 20.0**2
        area = surface_area(ball, spacing)
        assert area / (4 * math.pi * 20.0**2) == pytest.approx(over, abs=1e-3)
        edges, _, areas, _ = get_mask_edges(_tensor(ball), _tensor(ball), spacing=spacing)
        assert area == pytest.approx(float((areas * edges).sum()), rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_surface_metrics_match_monai(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 40, 3))
    spacing = tuple(rng.uniform(0.4, 3.0, 3))
    pred, label = _blobs(rng, shape)
    to_label, areas_pred, to_pred, areas_label = surface_distances(pred, label, spacing)
    want = _monai_surfels(pred, label, spacing)
    for got, expected in zip((to_label, areas_pred, to_pred, areas_label), want):  # the same surfels, same order
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for tolerance in (1.0, 2.5):
        nsd, hd95 = surface_metrics(pred, label, spacing, tolerance)
        assert nsd == pytest.approx(_monai_nsd(pred, label, spacing, tolerance), rel=1e-5)
        assert hd95 == pytest.approx(_monai_hd95(pred, label, spacing), rel=1e-5)


def test_case_metrics_crop_per_class_equals_monai_on_the_whole_volume():
    rng = np.random.default_rng(7)
    shape, spacing = (30, 24, 18), (0.8, 1.1, 2.5)
    pred, label = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for c in (1, 2, 3):
        a, b = _blobs(rng, shape)
        pred[a], label[b] = c, c
    pred[0, 0, 0] = 4  # class 4 in the prediction only; class 5 in neither
    result = case_metrics(pred, label, 6, spacing, nsd_tolerance=1.5)
    np.testing.assert_array_equal(result["dice"], dice_per_class(pred, label, 6))
    for c in (1, 2, 3):
        want = (_monai_nsd(pred == c, label == c, spacing, 1.5), _monai_hd95(pred == c, label == c, spacing))
        assert (result["nsd"][c - 1], result["hd95"][c - 1]) == pytest.approx(want, rel=1e-5)
    diagonal = math.sqrt((30 * 0.8) ** 2 + (24 * 1.1) ** 2 + (18 * 2.5) ** 2)
    assert result["nsd"][3] == 0.0 and result["hd95"][3] == pytest.approx(diagonal)
    assert math.isnan(result["nsd"][4]) and math.isnan(result["hd95"][4]) and math.isnan(result["dice"][4])


def test_shifted_box_by_hand_and_monai_border_voxels():
    """A 4^3 box and the same box one voxel on along x (0.5 mm; 1 mm along y and z). Along x the surfels
    lie in 5 layers of cubes; the shifted box's are one layer on. A surfel of the box is 0.5 mm from the
    shifted one's surface in its first layer (the whole face cap, chamfers and corners: the other's first
    layer is its cap, 0.5 mm on) and in the 3 x 3 flat middle of its last cap (the other's side surfels
    in that layer lie 1 mm away, its cap 0.5 mm); all its other surfels are the other's too. By symmetry the
    shifted box sees the same."""
    label = np.zeros((8, 6, 6), bool)
    label[1:5, 1:5, 1:5] = True
    pred = np.roll(label, 1, axis=0)
    spacing = (0.5, 1.0, 1.0)
    sx, sy, sz = spacing
    total = _box_area((4, 4, 4), spacing)
    first_layer = 9 * sy * sz + 2 * 3 * sy * math.hypot(sx, sz) / 2 + 2 * 3 * sz * math.hypot(sx, sy) / 2 \
        + 4 * math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8
    away = first_layer + 9 * sy * sz  # 0.5 mm from the other surface: 25.32 of 54.89 mm^2
    assert surface_metrics(pred, label, spacing, 0.5) == (1.0, 0.5)
    nsd, hd95 = surface_metrics(pred, label, spacing, 0.4)
    assert nsd == pytest.approx(1 - away / total) and nsd == pytest.approx(0.5387, abs=1e-4) and hd95 == 0.5
    assert nsd == pytest.approx(_monai_nsd(pred, label, spacing, 0.4), rel=1e-5)
    # MONAI's compute_hausdorff_distance counts border voxels (20 of each box's 56 lie 0.5 mm from the other's
    # border): HD95 0.5 mm as here, but its border-voxel NSD, 72/112 = 0.643, is another number.
    p, t = _tensor(pred[None, None]).float(), _tensor(label[None, None]).float()
    assert compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing)).item() == 0.5
    border_nsd = compute_surface_dice(p, t, [0.4], include_background=True, spacing=list(spacing)).item()
    assert border_nsd == pytest.approx(72 / 112)


def test_hd95_weighs_surfels_by_area():
    """The label is a 6^3 box (1 mm voxels); the prediction adds 8 single voxels, 4 on each x side, 2 empty
    voxels out. Each lone voxel has 8 corner triangles of sqrt(3)/8 mm^2: 4 at 2 mm from the box's surface
    and 4 at 3 mm. The box's own 218 surfels (150 flat squares of 1 mm^2, 60 chamfers of 1/sqrt(2), 8
    corners, 150 + 30 sqrt(2) + sqrt(3) mm^2 in all) are at 0 mm in both directions.

    Prediction -> label by area: within 0 mm 194.16 of 208.01 mm^2 (93.3 %), within 2 mm 201.09 (96.7 %):
    HD95 2 mm. By count the same surfels give 3 mm: 250 of 282 (88.7 %) are within 2 mm."""
    label = np.zeros((14, 10, 10), bool)
    label[4:10, 2:8, 2:8] = True
    pred = label.copy()
    for x, y, z in itertools.product((1, 12), (3, 5), (3, 5)):
        pred[x, y, z] = True
    box = 150 + 30 * math.sqrt(2) + math.sqrt(3)
    lone = 8 * math.sqrt(3)  # 8 voxels of sqrt(3) mm^2
    assert box / (box + lone) < 0.95 <= (box + lone / 2) / (box + lone)
    to_label, areas_pred, to_pred, areas_label = surface_distances(pred, label, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(np.unique(to_label, return_counts=True), [[0, 2, 3], [218, 32, 32]])
    assert areas_pred.sum() == pytest.approx(box + lone) and areas_label.sum() == pytest.approx(box)
    assert not to_pred.any()
    nsd, hd95 = surface_metrics(pred, label, (1.0, 1.0, 1.0))  # NSD at 2 mm: all but the 3 mm triangles
    assert hd95 == 2.0 and nsd == pytest.approx((2 * box + lone / 2) / (2 * box + lone))
    unweighted = np.sort(to_label)[math.ceil(0.95 * to_label.size) - 1]  # the 95 % nearest rank by count
    assert unweighted == 3.0 and np.percentile(to_label, 95) == 3.0


@pytest.mark.filterwarnings("ignore:the ground truth of class")
def test_surface_edge_cases():
    shape, spacing = (4, 5, 6), (1.0, 2.0, 3.0)
    empty = np.zeros(shape, bool)
    one = empty.copy()
    one[2, 2, 2] = True
    assert all(math.isnan(v) for v in surface_metrics(empty, empty, spacing))  # absent from both
    diagonal = math.sqrt(4**2 + 10**2 + 18**2)
    assert surface_metrics(one, empty, spacing) == (0.0, pytest.approx(diagonal))  # present in one only
    assert surface_metrics(empty, one, spacing) == (0.0, pytest.approx(diagonal))
    # MONAI's HD95 there is no number (NaN in MONAI 1.6, inf before); here one larger than any distance inside.
    p, t = _tensor(one[None, None]).float(), _tensor(empty[None, None]).float()
    assert not math.isfinite(compute_hausdorff_distance(p, t, include_background=True, percentile=95).item())
    to_empty, areas, from_empty, none = surface_distances(one, empty, spacing)
    assert np.isinf(to_empty).all() and areas.sum() == pytest.approx(7.0) and from_empty.size == none.size == 0
    assert surface_metrics(one, one, spacing) == (1.0, 0.0)  # a single voxel, matched
    # One voxel on along z (3 mm): the two share the 4 cubes between them; each one's other 4 corner
    # triangles (of equal area) are 3 mm from the other's surface.
    other = empty.copy()
    other[2, 2, 3] = True
    assert surface_metrics(other, one, spacing, 2.0) == (0.5, 3.0)
    assert surface_metrics(other, one, spacing, 3.0) == (1.0, 3.0)  # distance <= tolerance counts
    assert _monai_nsd(other, one, spacing, 2.0) == pytest.approx(0.5)
    # Empty volume and a one-voxel volume.
    nothing = case_metrics(np.zeros((0, 3, 3), np.uint8), np.zeros((0, 3, 3), np.uint8), 3, spacing)
    assert all(np.isnan(v).all() and v.shape == (2,) for v in nothing.values())
    voxel = np.ones((1, 1, 1), np.uint8)
    single = case_metrics(voxel, voxel, 2, spacing)
    assert (single["dice"][0], single["nsd"][0], single["hd95"][0]) == (1.0, 1.0, 0.0)


def test_surface_arguments_are_checked():
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(mask.astype(np.uint8), mask.astype(np.uint8), 2, (1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        surface_metrics(mask, mask, (1.0, 1.0, 1.0), -1.0)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((2, 3, 4), np.uint8), np.zeros((4, 3, 2), np.uint8), 2, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        surface_metrics(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        surface_area(np.ones((3, 3), bool), (1.0, 1.0, 1.0))


def test_surface_imports_only_numpy_scipy_and_the_standard_library():
    """surface.py copies into another codebase alone: no torch, no other module of mulmodseg."""
    code = "import sys, mulmodseg.surface; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {m for m in loaded if m.startswith("mulmodseg")} == {"mulmodseg", "mulmodseg.surface"}
    assert "torch" not in loaded
