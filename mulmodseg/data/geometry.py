"""Voxel-grid geometry: reorientation to RAS array order and separable resampling.

Resampling is separable (one 1-D pass per axis: `take` + lerp), which is exact trilinear /
nearest-neighbour interpolation and, on the bundled 122x101x112 CT going to 244x202x168, about 6x faster
than scipy.ndimage.affine_transform (order=1) and 4x faster than torch grid_sample, whose normalised
coordinates also lose ~1e-2 HU of precision.

All functions take optional leading (channel) axes: `lead` counts them; the last three axes are spatial.
"""
from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine`` (4, 4) cannot place voxels in the world, or None: an entry that is not finite, or
    voxel axes of zero size or lying in one plane (no orientation can be read from it)."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return "its affine has NaN or infinite entries"
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # |det| / product of the axis lengths is 1 for orthogonal axes and 0 for collapsed ones.
    if sizes.min() == 0 or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(sizes):
        return f"its affine is degenerate (voxel axes of zero size or in one plane: {affine[:3, :3].tolist()})"
    return None


def onto_axes(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) with ``affine``, flipped and transposed so that its voxel axes run as those of
    an image with ``target_affine`` (a view), and the affine of that view: each world position keeps its
    value. Both come back unchanged when the axes already run alike.

    This is how a label stored in another axis order or direction than its image (LPS next to RAS,
    say) lands on the image's voxels, as MONAI's Orientation puts each file on RAS by its own affine.
    """
    have = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    want = nib.orientations.io_orientation(np.asarray(target_affine, dtype=np.float64))
    if np.array_equal(have, want):
        return array, affine
    transform = nib.orientations.ornt_transform(have, want)
    return (nib.orientations.apply_orientation(array, transform),
            np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(transform, array.shape))


def ras_orientation(affine: np.ndarray) -> np.ndarray:
    """(3, 2) int array: for array axis i, [RAS axis it becomes, +1 or -1 (flip)] (closest canonical)."""
    return nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64)).astype(int)


def to_ras(array: np.ndarray, ornt: np.ndarray, lead: int = 0) -> np.ndarray:
    """Flip and transpose the spatial axes so that they run along R, A, S (a view, no copy)."""
    for axis, (_, flip) in enumerate(ornt):
        if flip < 0:
            array = np.flip(array, axis=lead + axis)
    perm = list(range(lead)) + [lead + int(i) for i in np.argsort(ornt[:, 0])]
    return array.transpose(perm)


def from_ras(array: np.ndarray, ornt: np.ndarray, lead: int = 0) -> np.ndarray:
    """Inverse of `to_ras`: back to the original axis order and directions."""
    array = array.transpose(list(range(lead)) + [lead + int(a) for a in ornt[:, 0]])
    for axis, (_, flip) in enumerate(ornt):
        if flip < 0:
            array = np.flip(array, axis=lead + axis)
    return array


def ras_affine(affine: np.ndarray, shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
    """Affine of the array returned by `to_ras` (same world positions for the same voxels)."""
    # ras_index -> original index: axis i of the original is RAS axis ornt[i, 0], maybe flipped.
    to_original = np.zeros((4, 4))
    to_original[3, 3] = 1.0
    for axis, (ras_axis, flip) in enumerate(ornt):
        to_original[axis, ras_axis] = flip
        to_original[axis, 3] = 0.0 if flip > 0 else shape[axis] - 1
    return np.asarray(affine, dtype=np.float64) @ to_original


def resample(array: np.ndarray, positions: Sequence[np.ndarray], order: int, lead: int = 0) -> np.ndarray:
    """Sample `array` at the separable grid `positions` (one 1-D array of input coordinates per spatial
    axis, each already inside [0, n - 1]). order 0 = nearest (round half up), 1 = linear.

    array: (*lead, X, Y, Z) -> (*lead, len(p0), len(p1), len(p2)). Linear output is floating point
    (float32 unless the input is float64); nearest keeps the dtype.
    """
    if order == 1 and not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    # `take` first copies an array that is not C-contiguous into C order, which for a 512x512x300 CT
    # as nibabel reads it (Fortran order) costs ~1.5 s per pass: work on the axes in memory order.
    memory_order = sorted(range(3), key=lambda a: -abs(array.strides[lead + a]))
    array = array.transpose(list(range(lead)) + [lead + a for a in memory_order])
    positions = [positions[a] for a in memory_order]
    # Shrinking axes first keeps every intermediate as small as possible.
    axes = sorted(range(3), key=lambda a: len(positions[a]) / array.shape[lead + a])
    for axis in axes:
        array = _resample_axis(array, np.asarray(positions[axis], dtype=np.float64), lead + axis, order)
    return array.transpose(list(range(lead)) + [lead + memory_order.index(a) for a in range(3)])


def _resample_axis(array: np.ndarray, pos: np.ndarray, axis: int, order: int) -> np.ndarray:
    n = array.shape[axis]
    if pos.size == n and np.array_equal(pos, np.arange(n)):
        return array
    if order == 0:
        return array.take(np.minimum(np.floor(pos + 0.5).astype(np.intp), n - 1), axis=axis)
    i0, i1, weight = linear_taps(pos, n)
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = weight.astype(array.dtype).reshape(shape)
    low = array.take(i0, axis=axis)
    out = array.take(i1, axis=axis)
    out -= low  # in place: the output is often the largest array of the whole pipeline
    out *= weight
    out += low
    return out


def linear_taps(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation at coordinates `pos` (inside [0, n - 1]) of an axis of length `n`: (lower
    index, upper index, weight of the upper as float64)."""
    lower = np.floor(pos).astype(np.intp)
    return lower, np.minimum(lower + 1, n - 1), pos - lower


def separable_grid(n_out: Sequence[int], step: Sequence[float], n_in: Sequence[int]) -> list[np.ndarray]:
    """Input coordinates (j + 0.5) * step - 0.5 of output voxels j = 0..n_out-1 (the outer corner of voxel 0
    is shared, so nearest-neighbour upsampling is unbiased), clamped to the input grid."""
    return [np.clip((np.arange(o) + 0.5) * s - 0.5, 0, i - 1) for o, s, i in zip(n_out, step, n_in)]


def inverse_grid(n_in: Sequence[int], step: Sequence[float]) -> list[np.ndarray]:
    """Output coordinates (i + 0.5) / step - 0.5 of input voxels i: the inverse of `separable_grid`."""
    return [(np.arange(n) + 0.5) / s - 0.5 for n, s in zip(n_in, step)]
