"""Surfaces of binary 3D masks, and the normalised surface Dice (NSD) and HD95 between two of them.

Surfaces follow the definition of DeepMind's ``surface-distance`` package (``compute_surface_distances``,
``compute_surface_dice_at_tolerance``, ``compute_robust_hausdorff``), which the AMOS and TotalSegmentator
evaluations use; MONAI's ``compute_surface_dice(..., use_subvoxels=True)`` computes the same NSD, and the
tests check against it. The surface of a mask, zero-padded by one voxel, is made of *surface elements*
(surfels): the 2x2x2 blocks of neighbouring voxels ("cubes", one per voxel corner) whose 8 voxels are
neither all inside nor all outside the mask. Each surfel has an area, in mm^2: that of the marching-cubes
surface inside its cube (vertices at the midpoints of the cube edges between an inside and an outside
voxel), measured with the voxel spacing (see :func:`surfel_area_table`). The distance from a surfel to
the other mask's surface is the Euclidean distance in mm, with the voxel spacing (axes taken as
orthogonal), between its cube's centre and the nearest cube centre of a surfel of the other mask. Then

- NSD at tolerance ``tau`` mm = (area of the prediction's surfels within ``tau`` of the label's surface
  + area of the label's surfels within ``tau`` of the prediction's) / (the area of both surfaces), where
  within means distance <= ``tau``;
- HD95 = the larger of the two directed, *area-weighted* 95th percentiles: in each direction, the
  smallest distance such that the surfels at most that far from the other surface hold 95 % of the
  surface area. A surfel counts by its area, not once; MONAI's ``compute_hausdorff_distance``, which
  counts border voxels once each, gives other values.

Two empty masks have neither: (NaN, NaN). When exactly one of them is empty, NSD is 0 and HD95 the diagonal
of the volume, ``sqrt(sum((shape_i * spacing_i)^2))`` mm: longer than any distance inside the volume, and
finite, so means stay numbers (DeepMind's ``surface-distance`` gives inf there, MONAI NaN or inf by version).

Only numpy, scipy and the standard library are imported: the module can be copied into another codebase.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "surfel_area_table",
    "surface_elements",
    "surface_area",
    "surface_distances",
    "surface_metrics",
    "surface_metrics_per_class",
    "check_nsd_tolerance",
]

_HD_PERCENTILE = 95.0

# ------------------------------------------------------------------------------------------ surface elements
#
# A cube is the 2x2x2 block of voxels (i + a, j + b, k + c), a, b, c in {0, 1}; corner (a, b, c) is bit
# 4a + 2b + c of the cube's code, set when that voxel is inside the mask. The surface inside a cube is
# built from the code alone, in voxel units with the cube spanning [0, 1]^3:
#
# 1. on each of the 6 faces, segments join the midpoints of the face's edges whose two corners differ
#    (one segment, or two when the face's inside corners are diagonal: then each segment cuts off one
#    corner of the side with fewer corners in the whole cube; on a 4-4 tie the inside ones, though the
#    outside ones give the same areas). So a code and its complement have the same area, as in the
#    marching-cubes table of DeepMind's package;
# 2. the segments close into polygons (every edge midpoint lies on two faces);
# 3. each polygon, planar or not, is cut into triangles: of all its triangulations (by diagonals), one
#    whose triangles lie in the fewest distinct planes, i.e. split into as few flat pieces as possible
#    (where several do, they have the same area for every spacing). These are the choices with which
#    every code's area equals that of DeepMind's table, for any spacing: the tests check all 256.
#
# Each triangle is kept as its area vector n = (e1 x e2) / 2 in voxel units; with spacing s the edge
# vectors are e * s, and the area vector becomes (n0 s1 s2, n1 s0 s2, n2 s0 s1).

_CORNERS = tuple(itertools.product((0, 1), repeat=3))  # corner (a, b, c) is bit 4a + 2b + c


def _cube_faces() -> list[list[int]]:
    """The 6 faces of the cube, each as its 4 corner bits in order around the face."""
    faces = []
    for axis in range(3):
        u, v = (d for d in range(3) if d != axis)
        for side in (0, 1):
            ring = []
            for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[u], corner[v] = side, du, dv
                ring.append(4 * corner[0] + 2 * corner[1] + corner[2])
            faces.append(ring)
    return faces


def _surface_polygons(code: int) -> list[np.ndarray]:
    """The closed polygons of the surface inside a cube with this code: each (n, 3) vertices, in order."""
    inside = [bool(code >> bit & 1) for bit in range(8)]
    cut_inside = sum(inside) <= 4  # which corners an ambiguous face cuts off
    links: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for ring in _cube_faces():
        flags = [inside[bit] for bit in ring]
        edges = [tuple(sorted((ring[i], ring[(i + 1) % 4]))) for i in range(4)]  # edge i: corners i, i + 1
        crossed = [i for i in range(4) if flags[i] != flags[(i + 1) % 4]]
        if len(crossed) == 2:
            pairs = [tuple(crossed)]
        elif len(crossed) == 4:  # diagonal corners: cut off corner i between its edges i - 1 and i
            pairs = [((i - 1) % 4, i) for i in range(4) if flags[i] == cut_inside]
        else:
            pairs = []
        for i, j in pairs:
            links.setdefault(edges[i], []).append(edges[j])
            links.setdefault(edges[j], []).append(edges[i])
    polygons, seen = [], set()
    for start in links:
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        seen.add(start)
        while True:
            a, b = links[current]
            following = b if a == previous else a
            if following == start:
                break
            loop.append(following)
            seen.add(following)
            previous, current = current, following
        corners = np.asarray(_CORNERS, dtype=np.float64)
        polygons.append(np.array([(corners[p] + corners[q]) / 2 for p, q in loop]))
    return polygons


@functools.cache
def _triangulations(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Every triangulation of a polygon with vertices 0..n-1 by non-crossing diagonals."""

    @functools.cache
    def between(i: int, j: int) -> list[tuple[tuple[int, int, int], ...]]:  # the sub-polygon i, i+1, ..., j
        if j - i < 2:
            return [()]
        return [left + right + ((i, k, j),) for k in range(i + 1, j) for left in between(i, k)
                for right in between(k, j)]

    return tuple(between(0, n - 1))


def _plane_count(points: np.ndarray, triangles: Sequence[tuple[int, int, int]]) -> int:
    planes = set()
    for t in triangles:
        a, b, c = points[list(t)]
        normal = np.cross(b - a, c - a)
        normal /= np.linalg.norm(normal)
        offset = normal @ a
        if normal[np.flatnonzero(np.abs(normal) > 1e-9)[0]] < 0:  # one orientation per plane
            normal, offset = -normal, -offset
        planes.add(tuple(np.round([*normal, offset], 9) + 0.0))
    return len(planes)


@functools.lru_cache(maxsize=1)
def _code_area_vectors() -> np.ndarray:
    """float64 (256, T, 3): the area vectors, in voxel units, of the T (at most) triangles of each code."""
    per_code = []
    for code in range(256):
        vectors = []
        for polygon in _surface_polygons(code):
            best = min(_triangulations(len(polygon)), key=lambda tri: _plane_count(polygon, tri))
            for i, j, k in best:
                vectors.append(np.cross(polygon[j] - polygon[i], polygon[k] - polygon[i]) / 2)
        per_code.append(vectors)
    table = np.zeros((256, max(map(len, per_code)), 3))
    for code, vectors in enumerate(per_code):
        if vectors:
            table[code, : len(vectors)] = vectors
    return table


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """float64 (256,): the area in mm^2 of the surface inside a cube of 2x2x2 voxels with this spacing
    (mm per axis), indexed by the cube's code: bit ``4a + 2b + c`` is set when voxel ``(a, b, c)`` of the
    cube is inside. Codes 0 and 255 (no surface) have area 0, every other code a positive one. With unit
    spacing a single corner inside gives a triangle of area sqrt(3)/8, and 4 corners of a face a unit square.
    """
    s0, s1, s2 = _check_spacing(spacing, 3)
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(_code_area_vectors() * scale, axis=-1).sum(-1)


def _cube_codes(mask: np.ndarray) -> np.ndarray:
    """bool (X, Y, Z) -> uint8 (X+1, Y+1, Z+1): the code of every cube of the mask zero-padded by one voxel;
    cube (i, j, k) holds voxels i-1..i, j-1..j, k-1..k of the mask."""
    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    x, y, z = (n + 1 for n in mask.shape)
    codes = np.zeros((x, y, z), dtype=np.uint8)
    for bit, (a, b, c) in enumerate(_CORNERS):
        codes |= padded[a : a + x, b : b + y, c : c + z] << np.uint8(bit)
    return codes


def surface_elements(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """bool (X, Y, Z), spacing in mm per axis -> float64 (X+1, Y+1, Z+1): the surfel area (mm^2) of every
    cube of the mask zero-padded by one voxel (cube ``(i, j, k)`` holds voxels ``i-1..i, j-1..j, k-1..k``),
    0 for the cubes off the surface."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask shape {mask.shape}: surfaces are defined for 3D masks")
    return surfel_area_table(spacing)[_cube_codes(mask)]


def surface_area(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """The area in mm^2 of the surface of a bool (X, Y, Z) mask: the sum of its surfel areas."""
    mask = np.asarray(mask, dtype=bool)
    box = ndimage.find_objects(mask.astype(np.uint8))
    return float(surface_elements(mask[box[0]] if box else mask[:0], spacing).sum())


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing}: need {ndim} positive voxel sizes in mm")
    return spacing


def check_nsd_tolerance(tolerance: float) -> float:
    """``tolerance`` as a float, or ValueError unless it is a finite distance >= 0 (mm)."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance {tolerance}: must be a distance in mm, at least 0")
    return float(tolerance)


def _check_pair(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]):
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    if pred.ndim != 3:
        raise ValueError(f"mask shape {pred.shape}: surfaces are defined for 3D masks")
    return pred, label, _check_spacing(spacing, 3)


def _joint_box(pred: np.ndarray, label: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the voxels of two bool masks (empty slices when both are empty)."""
    box = ndimage.find_objects((pred | label).astype(np.uint8))
    return box[0] if box else tuple(slice(0, 0) for _ in pred.shape)


def _distances(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]):
    """The surfels of two bool masks (a crop holding both whole): (distances from the prediction's surfels
    to the label's surface, their areas, distances from the label's surfels to the prediction's surface,
    their areas), float64 1D each, surfels in C order. A distance to an empty surface is inf."""
    table = surfel_area_table(spacing)
    areas = [table[_cube_codes(mask)] for mask in (pred, label)]
    on_surface = [a > 0 for a in areas]
    to_other = []
    for this, other in ((0, 1), (1, 0)):
        if not on_surface[this].any():
            to_other.append(np.zeros(0))
        elif not on_surface[other].any():
            to_other.append(np.full(np.count_nonzero(on_surface[this]), math.inf))
        else:
            # Distance of every cube to the nearest surfel of the other mask, read at this mask's surfels.
            to_other.append(ndimage.distance_transform_edt(~on_surface[other], sampling=spacing)[on_surface[this]])
    return to_other[0], areas[0][on_surface[0]], to_other[1], areas[1][on_surface[1]]


def surface_distances(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The surfels of two binary masks on one voxel grid and their distances to the other surface.

    pred, label: bool (X, Y, Z); spacing: mm per axis. Returns float64 1D arrays ``(pred_to_label,
    pred_areas, label_to_pred, label_areas)``: for each surfel of the prediction its distance in mm to the
    label's surface and its area in mm^2, then the same for the label's surfels (surfels in C order of
    their cubes; a distance to an empty surface is inf, an empty mask has no surfels). As DeepMind's
    ``compute_surface_distances``, without its sorting.
    """
    pred, label, spacing = _check_pair(pred, label, spacing)
    crop = _joint_box(pred, label)
    return _distances(pred[crop], label[crop], spacing)


def _weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float = _HD_PERCENTILE) -> float:
    """The smallest distance d such that the surfels at distance <= d hold ``percent`` % of the area."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order])
    # A relative 1e-12 slack, so that a share that is exactly the percentile in real numbers reaches it.
    index = np.searchsorted(cumulative, cumulative[-1] * (percent / 100.0) * (1 - 1e-12))
    return float(distances[order[min(index, len(order) - 1)]])


def _surface_pair(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, ...], tolerance: float,
                  diagonal: float) -> tuple[float, float]:
    """(NSD, HD95) of two bool masks (a crop holding both whole), with the conventions of the module."""
    in_pred, in_label = bool(pred.any()), bool(label.any())
    if not (in_pred or in_label):
        return math.nan, math.nan
    if not (in_pred and in_label):
        return 0.0, diagonal
    to_label, pred_areas, to_pred, label_areas = _distances(pred, label, spacing)
    within = pred_areas[to_label <= tolerance].sum() + label_areas[to_pred <= tolerance].sum()
    nsd = within / (pred_areas.sum() + label_areas.sum())
    hd95 = max(_weighted_percentile(to_label, pred_areas), _weighted_percentile(to_pred, label_areas))
    return float(nsd), hd95


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * np.asarray(spacing)) ** 2)))


def surface_metrics(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float], tolerance: float = 2.0
                    ) -> tuple[float, float]:
    """(NSD, HD95 in mm) of two binary masks on one voxel grid, with DeepMind's surfels (see the module).

    pred, label: bool (X, Y, Z); spacing: voxel size in mm per axis; tolerance: the NSD's in mm.
    NSD is the share of the surface area of both masks within ``tolerance`` of the other mask's surface
    (distance <= tolerance); HD95 is the larger of the two directed area-weighted 95th percentiles of the
    surfel distances. Both absent: (NaN, NaN); one absent: (0, the volume's diagonal in mm).
    """
    pred, label, spacing = _check_pair(pred, label, spacing)
    crop = _joint_box(pred, label)
    return _surface_pair(pred[crop], label[crop], spacing, check_nsd_tolerance(tolerance),
                         _diagonal(pred.shape, spacing))


def surface_metrics_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float],
                              tolerance: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(NSD at ``tolerance`` mm, HD95 in mm) of classes 1..num_classes-1 of two label maps, each float64
    (num_classes - 1,), NaN for a class in neither map (see the module).

    pred, label: integer (X, Y, Z) on the same grid, values in [0, num_classes); spacing: mm per axis. Each
    class is measured inside the bounding box of its voxels in either map (padded by one voxel for the
    surfels), which holds both surfaces whole.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    if pred.ndim != 3:
        raise ValueError(f"label map shape {pred.shape}: surfaces are defined for 3D label maps")
    spacing = _check_spacing(spacing, pred.ndim)
    tolerance = check_nsd_tolerance(tolerance)
    count = num_classes - 1
    nsd, hd95 = np.full(count, np.nan), np.full(count, np.nan)
    diagonal = _diagonal(pred.shape, spacing)
    pred_boxes = ndimage.find_objects(pred, max_label=count) if count else []
    label_boxes = ndimage.find_objects(label, max_label=count) if count else []
    for c, (a, b) in enumerate(zip(pred_boxes, label_boxes)):
        if a is None and b is None:
            continue
        crop = a if b is None else b if a is None else tuple(
            slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
        nsd[c], hd95[c] = _surface_pair(pred[crop] == c + 1, label[crop] == c + 1, spacing, tolerance, diagonal)
    return nsd, hd95
