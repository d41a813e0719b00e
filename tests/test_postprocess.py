"""mulmodseg.postprocess on hand-made label maps: 26-connected components, voxel counts, volumes in mm^3."""

import numpy as np
import pytest

from mulmodseg.postprocess import keep_largest_component, keep_largest_ids, postprocess, remove_small_components

CLASSES = ["background", "liver", "right kidney", "spleen"]


def label_map() -> np.ndarray:
    """Class 1: a 3x3x3 cube (27 voxels) with a voxel touching its corner (26-connected: 28 voxels) and a
    lone voxel far away; class 2: blocks of 8 and 4 voxels; class 3: one block of 6."""
    label = np.zeros((12, 10, 8), np.uint8)
    label[0:3, 0:3, 0:3] = 1
    label[3, 3, 3] = 1  # shares only a corner with the cube's voxel (2, 2, 2)
    label[9, 9, 7] = 1
    label[6:8, 0:2, 4:6] = 2
    label[10:12, 5:7, 0] = 2
    label[5, 5:8, 0:2] = 3
    return label


def counts(label: np.ndarray) -> list[int]:
    return np.bincount(label.ravel(), minlength=4).tolist()


def test_keep_largest_keeps_the_26_connected_component_of_the_named_classes():
    label = label_map()
    before = label.copy()
    out = keep_largest_component(label, [1])
    assert counts(out) == [960 - 28 - 12 - 6, 28, 12, 6]  # the corner voxel stays with the cube, the lone one goes
    assert out[3, 3, 3] == 1 and out[9, 9, 7] == 0
    assert np.array_equal(label, before)  # the input is left as it is
    out = keep_largest_component(label, [1, 2, 3])
    assert counts(out) == [960 - 28 - 8 - 6, 28, 8, 6]
    assert out[10, 5, 0] == 0 and out[6, 0, 4] == 2


def test_remove_small_components_counts_voxels():
    out = remove_small_components(label_map(), 6)
    assert counts(out) == [960 - 28 - 8 - 6, 28, 8, 6]  # the lone voxel and the 4-voxel block go; 6 stays
    assert counts(remove_small_components(label_map(), 7)) == [960 - 28 - 8, 28, 8, 0]


def test_postprocess_turns_mm3_into_voxels_with_the_spacing():
    spacing = (2.0, 1.0, 2.5)  # 5 mm^3 a voxel
    assert counts(postprocess(label_map(), spacing)) == counts(label_map())  # nothing asked: unchanged
    # 30 mm^3 = 6 voxels: the 4-voxel block and the lone voxel go, the 6-voxel spleen stays.
    assert counts(postprocess(label_map(), spacing, min_component_mm3=30.0)) == [960 - 28 - 8 - 6, 28, 8, 6]
    assert counts(postprocess(label_map(), spacing, min_component_mm3=30.5)) == [960 - 28 - 8, 28, 8, 0]
    # Largest first, then the volume: the kidney keeps its 8 voxels (40 mm^3), the liver 28 (140 mm^3).
    out = postprocess(label_map(), spacing, keep_largest=[2], min_component_mm3=41.0)
    assert counts(out) == [960 - 28, 28, 0, 0]
    assert counts(postprocess(np.zeros((4, 4, 4), np.uint8), spacing, [1, 2, 3], 10.0)) == [64, 0, 0, 0]


def test_classes_by_name_underscore_or_value():
    values = {1: 1, 2: 2, 3: 3}
    assert keep_largest_ids([], CLASSES, values) == [1, 2, 3]  # none named: every class
    assert keep_largest_ids(["spleen", "right_kidney", "right kidney", "1"], CLASSES, values) == [1, 2, 3]
    # With a label map the values are the dataset's, as the written label maps hold them.
    assert keep_largest_ids(["205", "spleen"], CLASSES, {1: 205, 3: 850}) == [1, 3]
    with pytest.raises(ValueError, match=r"--keep_largest background 2 aorta: not a class of this checkpoint .*"
                                         r"give names or values of: 205 'liver', 850 'spleen'"):
        keep_largest_ids(["background", "2", "aorta", "liver"], CLASSES, {1: 205, 3: 850})
