"""Evaluation: per-class Dice, normalised surface Dice (NSD) and HD95 of label maps, summaries over cases,
CSV/Markdown/JSON tables, and model cost.

Conventions (background, class 0, is never scored):

- a class absent from both the prediction and the label is *absent*: NaN in arrays, an empty cell in the
  CSV files, ``absent`` in the Markdown, ``null`` in JSON, and left out of every mean (MONAI's
  ``DiceMetric`` with ``ignore_empty=True`` gives NaN whenever the label lacks the class; here a class
  predicted but not in the label is scored, since it is a real error);
- a class present in exactly one of them has Dice 0, NSD 0 and HD95 equal to the diagonal of the volume,
  ``sqrt(sum((shape_i * spacing_i)^2))`` mm: longer than any distance inside the volume, and finite, so
  means stay numbers (DeepMind's ``surface-distance`` gives inf there, MONAI NaN or inf by version).

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

A *row* is one evaluated case: ``{"case": str, "modality": str, "dice": (C,), "nsd": (C,), "hd95": (C,)}``
with ``C = num_classes - 1`` foreground classes, as :func:`case_metrics` gives them (``nsd`` and ``hd95``
are optional: tables hold the metrics the rows have). A *summary* is what :func:`summarise` returns for
a list of rows and one metric.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "METRICS",
    "surfel_area_table",
    "surface_elements",
    "surface_area",
    "surface_distances",
    "surface_metrics",
    "case_metrics",
    "check_nsd_tolerance",
    "row_metrics",
    "dice_per_class",
    "summarise",
    "write_metrics_csv",
    "summary_rows",
    "markdown_table",
    "write_summary_csv",
    "write_summary_json",
    "write_reports",
    "REPORT_FILES",
    "count_parameters",
    "count_flops",
]

ABSENT = "absent"
REPORT_FILES = ("metrics.csv", "summary.md", "summary.csv", "summary.json")
# Metric key -> (name in tables, scale for the summary tables, unit there).
METRICS = {"dice": ("Dice", 100.0, "%"), "nsd": ("NSD", 100.0, "%"), "hd95": ("HD95", 1.0, "mm")}
_HD_PERCENTILE = 95.0
_CHUNK = 1 << 24  # voxels per bincount pass: bounds the int64 temporaries for 512x512x1000 volumes

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


@functools.lru_cache(maxsize=None)
def _triangulations(n: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Every triangulation of a polygon with vertices 0..n-1 by non-crossing diagonals."""

    @functools.lru_cache(maxsize=None)
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
    box = ndimage.find_objects((pred | label).astype(np.uint8))
    crop = box[0] if box else tuple(slice(0, 0) for _ in range(3))
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
    box = ndimage.find_objects((pred | label).astype(np.uint8))
    crop = box[0] if box else ()
    return _surface_pair(pred[crop], label[crop], spacing, check_nsd_tolerance(tolerance), _diagonal(pred.shape, spacing))


def case_metrics(pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float],
                 nsd_tolerance: float = 2.0) -> dict[str, np.ndarray]:
    """Dice, NSD at ``nsd_tolerance`` mm and HD95 in mm of classes 1..num_classes-1 of one case, with the
    surfels of DeepMind's ``surface-distance`` (see the module).

    pred, label: integer (X, Y, Z) on the same grid, values in [0, num_classes); spacing: mm per axis.
    Returns ``{"dice", "nsd", "hd95"}``, each float64 (num_classes - 1,). Each class is measured inside
    the bounding box of its voxels in either map (padded by one voxel for the surfels), which holds both
    surfaces whole: a 488x404x448 scan with 12 organs takes about 10 s on 2 CPU cores.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    if pred.ndim != 3:
        raise ValueError(f"label map shape {pred.shape}: surfaces are defined for 3D label maps")
    spacing = _check_spacing(spacing, pred.ndim)
    tolerance = check_nsd_tolerance(nsd_tolerance)
    dice = dice_per_class(pred, label, num_classes)  # also checks the values
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
    return {"dice": dice, "nsd": nsd, "hd95": hd95}


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..num_classes-1 between two label maps of the same shape.

    pred, label: integer arrays (any shape, e.g. (X, Y, Z)) with values in [0, num_classes).
    Returns float64 (num_classes - 1,): 1 for a perfect match, NaN where the class is in neither map.
    """
    pred = np.asarray(pred).reshape(-1)
    label = np.asarray(label).reshape(-1)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} voxels, label {label.size}")
    # confusion[l, p] = number of voxels with label l and prediction p, from one bincount of l*K + p.
    confusion = np.zeros(num_classes * num_classes, dtype=np.int64)
    for start in range(0, pred.size, _CHUNK):
        p = pred[start : start + _CHUNK].astype(np.int64)
        t = label[start : start + _CHUNK].astype(np.int64)
        if p.min(initial=0) < 0 or t.min(initial=0) < 0 or max(p.max(initial=0), t.max(initial=0)) >= num_classes:
            raise ValueError(f"label values must lie in [0, {num_classes})")
        confusion += np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    overlap = np.diag(confusion)[1:].astype(np.float64)
    total = (confusion.sum(0) + confusion.sum(1))[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * overlap / total, np.nan)


def summarise(rows: Sequence[dict], metric: str = "dice") -> dict:
    """Per-class mean and standard deviation of ``metric`` over cases, ignoring cases where the class is absent.

    Returns ``{"per_class": (C,) float64 means, NaN for a class absent in every case; "std": (C,) the
    population standard deviation (numpy's ``std``, ddof=0) of the same values; "present": (C,) int64,
    cases where the class is present; "mean": float, the mean of the non-NaN per-class means (the
    table's Average column); "case_std": float, the standard deviation over cases of each case's mean
    over its present classes (the Average's spread); "cases": int}``.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    values = np.stack([np.asarray(row[metric], dtype=np.float64) for row in rows])  # (cases, C)
    present = (~np.isnan(values)).sum(0)
    with np.errstate(invalid="ignore"):
        per_class = np.where(present > 0, np.nansum(values, 0) / np.maximum(present, 1), np.nan)
        std = np.where(present > 0, np.sqrt(np.nansum((values - per_class) ** 2, 0) / np.maximum(present, 1)), np.nan)
    scored = per_class[~np.isnan(per_class)]
    case_means = np.array([_mean(v) for v in values])
    case_means = case_means[~np.isnan(case_means)]
    return {
        "per_class": per_class,
        "std": std,
        "present": present,
        "mean": float(scored.mean()) if scored.size else math.nan,
        "case_std": float(case_means.std()) if case_means.size else math.nan,
        "cases": len(rows),
    }


def row_metrics(rows: Sequence[dict]) -> list[str]:
    """The keys of :data:`METRICS` that the rows hold, in the order of METRICS."""
    return [m for m in METRICS if rows and m in rows[0]]


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str]) -> None:
    """One line per case, numbers only: ``case, modality``, the Dice (0..1) per class and ``mean`` (the
    mean over the case's present classes), then, when the rows hold them, ``NSD <class>`` ... ``NSD mean``
    (0..1) and ``HD95 <class>`` ... ``HD95 mean`` (mm). An absent class is an empty cell.

    class_names: the C foreground names (no background).
    """
    metrics = row_metrics(rows)
    names = _check_names(class_names, len(rows[0]["dice"]) if rows else None)
    header = ["case", "modality", *names, "mean"]
    for metric in metrics[1:]:
        label = METRICS[metric][0]
        header += [f"{label} {name}" for name in [*names, "mean"]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            cells = [row["case"], row["modality"]]
            for metric in metrics:
                values = np.asarray(row[metric], dtype=np.float64)
                cells += [_number(v, 1.0, 6) for v in [*values, _mean(values)]]
            writer.writerow(cells)


def summary_rows(settings: dict[str, dict], class_names: Sequence[str], metric: str = "dice", std: bool = False
                 ) -> list[list[str]]:
    """The paper's layout as text cells: a header, then one row per setting, one column per organ, then
    ``Average``. Dice and NSD in percent, HD95 in mm, with two decimals; ``absent`` where no case had the
    class. With ``std``, each cell is ``mean ± std`` (the Average's spread is ``case_std``, see :func:`summarise`).

    settings: setting name (e.g. ``"CT, ALT"``) -> a :func:`summarise` result for ``metric``.
    """
    scale = METRICS[metric][1]
    table = [["Setting", *class_names, "Average"]]
    for name, summary in settings.items():
        _check_names(class_names, len(summary["per_class"]))
        cells = []
        for mean, spread in zip([*summary["per_class"], summary["mean"]], [*summary["std"], summary["case_std"]]):
            if math.isnan(mean):
                cells.append(ABSENT)
            else:
                cells.append(_number(mean, scale, 2) + (f" ± {_number(spread, scale, 2)}" if std else ""))
        table.append([name, *cells])
    return table


def markdown_table(settings: dict[str, dict], class_names: Sequence[str], metric: str = "dice",
                   std: bool = False) -> str:
    """:func:`summary_rows` as a Markdown table (Dice and NSD in %, HD95 in mm), ending with a newline."""
    header, *body = summary_rows(settings, class_names, metric, std)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_summary_csv(path: str | os.PathLike, settings: dict[str, dict[str, dict]], class_names: Sequence[str]
                      ) -> None:
    """The summary tables as CSV, numbers only: ``setting, metric, statistic``, one column per class, then
    ``Average``. For each setting and metric (``dice``, ``nsd`` in %; ``hd95`` in mm) three lines: ``mean``,
    ``std`` and ``n`` (cases where the class is present; the Average's is the number of cases), as in
    :func:`summary_rows` with ``std``. An absent class is an empty cell.

    settings: setting name -> metric key -> a :func:`summarise` result.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "metric", "statistic", *class_names, "Average"])
        for name, summaries in settings.items():
            for metric, summary in summaries.items():
                scale = METRICS[metric][1]
                _check_names(class_names, len(summary["per_class"]))
                means = [*summary["per_class"], summary["mean"]]
                spreads = [*summary["std"], summary["case_std"]]
                writer.writerow([name, metric, "mean", *(_number(v, scale, 2) for v in means)])
                writer.writerow([name, metric, "std", *(_number(v, scale, 2) for v in spreads)])
                writer.writerow([name, metric, "n", *map(int, summary["present"]), summary["cases"]])


def write_summary_json(path: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str], setting: str,
                       settings: dict) -> None:
    """nnU-Net's ``summary.json`` layout for one setting: ``setting``, ``settings`` (how it was scored),
    ``classes``, ``foreground_mean`` (metric -> the mean of the per-class means, and ``case_std``),
    ``mean`` (class -> metric -> ``mean``, ``std``, ``n``) and ``metric_per_case`` (each row's other keys,
    with ``metrics``: class -> metric -> value). Values are fractions (Dice, NSD) and mm (HD95), unrounded;
    absent is ``null``.
    """
    metrics = row_metrics(rows)
    names = _check_names(class_names, len(rows[0]["dice"]) if rows else None)
    summaries = {m: summarise(rows, m) for m in metrics}
    report = {
        "setting": setting,
        "settings": settings,
        "classes": names,
        "foreground_mean": {m: {"mean": _json(s["mean"]), "case_std": _json(s["case_std"])}
                            for m, s in summaries.items()},
        "mean": {name: {m: {"mean": _json(s["per_class"][c]), "std": _json(s["std"][c]), "n": int(s["present"][c])}
                        for m, s in summaries.items()} for c, name in enumerate(names)},
        "metric_per_case": [
            {**{k: v for k, v in row.items() if k not in METRICS},
             "metrics": {name: {m: _json(row[m][c]) for m in metrics} for c, name in enumerate(names)}}
            for row in rows
        ],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def write_reports(output_dir: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str], setting: str,
                  settings: dict, note: str = "") -> str:
    """Write :data:`REPORT_FILES` into ``output_dir``: metrics.csv (one line per case), summary.md (a
    table per metric, mean ± std over cases, then ``note``), summary.csv and summary.json. This is the one
    writer of evaluation results (``mulmodseg.evaluate`` and infer.py's ``--labels``). Returns the Markdown.

    rows: as :func:`case_metrics` gives them plus ``case`` and ``modality`` (and any other keys, which go
    into summary.json); class_names: the C foreground names; setting: the row name of the tables (e.g.
    ``"unet CT"``); settings: how the cases were scored, for summary.json.
    """
    output_dir = Path(output_dir)
    metrics = row_metrics(rows)
    summaries = {m: summarise(rows, m) for m in metrics}
    parts = []
    for metric, summary in summaries.items():
        name, _, unit = METRICS[metric]
        tolerance = f" at {settings['nsd_tolerance_mm']:g} mm" if metric == "nsd" and "nsd_tolerance_mm" in settings else ""
        parts.append(f"{name}{tolerance} ({unit}), mean ± std over {summary['cases']} case(s):\n\n"
                     + markdown_table({setting: summary}, class_names, metric, std=True))
    markdown = "\n".join(parts) + (f"\n{note}\n" if note else "")
    write_metrics_csv(output_dir / "metrics.csv", rows, class_names)
    (output_dir / "summary.md").write_text(markdown, encoding="utf-8")
    write_summary_csv(output_dir / "summary.csv", {setting: summaries}, class_names)
    write_summary_json(output_dir / "summary.json", rows, class_names, setting, settings)
    return markdown


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: Sequence[int], **forward_kwargs) -> int:
    """Floating-point operations of one forward pass on a zero input of ``input_shape``, e.g. (1, 1, 96, 96, 96).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: convolutions (incl. transposed), linear
    layers, matrix products and attention, with one multiply-accumulate counted as 2 FLOPs; element-wise
    work (normalisation, activations, bias adds, softmax) is not counted. GFLOPs = result / 1e9. The
    model runs once in eval mode without gradients (so BatchNorm statistics are untouched) and its
    train/eval mode is restored afterwards.
    """
    reference = next(iter(model.parameters()), None)
    x = torch.zeros(
        tuple(input_shape),
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x, **forward_kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _number(value: float, scale: float, decimals: int) -> str:
    """A CSV cell: the scaled value, or empty for NaN (absent)."""
    return "" if math.isnan(value) else f"{value * scale:.{decimals}f}"


def _mean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


def _json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _check_names(class_names: Iterable[str], expected: int | None) -> list[str]:
    names = list(class_names)
    if expected is not None and len(names) != expected:
        raise ValueError(f"{len(names)} class names for {expected} foreground classes (leave out the background)")
    return names
