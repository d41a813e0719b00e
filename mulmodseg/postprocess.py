"""Postprocessing of label maps on the scan's own grid: keep each named class's largest connected component
(``--keep_largest``), remove components below a volume (``--min_component_mm3``).

Pure functions on numpy label maps ``(X, Y, Z)`` of class ids. Components are 26-connected (voxels that
share a face, an edge or a corner belong together, ``scipy.ndimage.label`` with a 3x3x3 structure), as
nnU-Net's postprocessing labels them: on thick slices an organ's cross-sections often touch the next
slice's only along an edge, and 6-connectivity would cut such an organ into pieces. Removed voxels become
background (0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# 26-connectivity: every voxel of the 3x3x3 neighbourhood.
STRUCTURE = ndimage.generate_binary_structure(3, 3)


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mask: (X, Y, Z)`` bool -> (component index per voxel (X, Y, Z), 0 outside the mask; voxel count of
    components 1..N as an (N + 1,) array whose entry 0 is 0)."""
    components, count = ndimage.label(mask, structure=STRUCTURE)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components, sizes


def keep_largest_component(label: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``label: (X, Y, Z)`` class ids -> a copy in which each of ``classes`` keeps only its largest
    26-connected component; its other voxels become background. On a tie the component met first in
    C order stays."""
    out = label.copy()
    for k in classes:
        components, sizes = component_sizes(label == k)
        if sizes.sum() > 0:
            out[(components != 0) & (components != int(sizes.argmax()))] = 0
    return out


def remove_small_components(label: np.ndarray, min_voxels: float) -> np.ndarray:
    """``label: (X, Y, Z)`` class ids -> a copy in which every 26-connected component of a class (background
    excepted) with fewer than ``min_voxels`` voxels is background."""
    out = label.copy()
    for k in np.unique(label):
        if k == 0:
            continue
        components, sizes = component_sizes(label == k)
        out[(sizes < min_voxels)[components] & (components != 0)] = 0
    return out


def postprocess(label: np.ndarray, spacing: Sequence[float], keep_largest: Sequence[int] = (),
                min_component_mm3: float | None = None) -> np.ndarray:
    """``label: (X, Y, Z)`` class ids on a grid of voxel sizes ``spacing`` (mm) -> the label map with only
    the largest component of each class in ``keep_largest``, then without any component smaller than
    ``min_component_mm3`` mm^3 (a class whose components are all smaller disappears). ``label`` itself
    is left as it is."""
    out = keep_largest_component(label, keep_largest) if keep_largest else label
    if min_component_mm3 is not None:
        out = remove_small_components(out, min_component_mm3 / float(np.prod(spacing)))
    return out


def keep_largest_ids(names: Sequence[str], classes: Sequence[str], values: dict[int, int]) -> list[int]:
    """``--keep_largest`` arguments -> class ids (1..K-1). Each is a class name of ``classes`` (spaces may be
    written as underscores) or a value as the label maps hold it (``values``: class id -> written value);
    none named means every class. Raises ValueError naming each unknown one, and for background."""
    by_name = {name: k for k, name in enumerate(classes)}
    by_name |= {name.replace(" ", "_"): k for k, name in enumerate(classes)}
    by_value = {str(v): k for k, v in values.items()}
    if not names:
        return sorted(values)
    ids, unknown = [], []
    for name in names:
        k = by_name.get(name, by_value.get(name))
        if k is None or k not in values:
            unknown.append(name)
        else:
            ids.append(k)
    if unknown:
        known = ", ".join(f"{v} {classes[k]!r}" for k, v in sorted(values.items()))
        raise ValueError(f"--keep_largest {' '.join(unknown)}: not a class of this checkpoint (background cannot be "
                         f"postprocessed); give names or values of: {known}")
    return sorted(set(ids))
