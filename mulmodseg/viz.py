"""PNG pictures without plotting libraries: label-map previews and training curves.

PNGs are written with the standard library (``zlib``) as 8-bit RGB, non-interlaced, every row with
filter type 0. Text on the curves uses a built-in 3x5 pixel font (upper-case letters, digits and a few
signs; lower case is drawn as upper case).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["write_png", "read_png", "read_png_text", "label_colors", "preview", "plot_curves"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path: str | os.PathLike, rgb: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write rgb: (H, W, 3) uint8 as a PNG; ``text`` becomes Latin-1 ``tEXt`` chunks (keyword -> value)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    chunks += [(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in (text or {}).items()]
    chunks += [(b"IDAT", zlib.compress(rows.tobytes(), 6)), (b"IEND", b"")]
    with open(path, "wb") as f:
        f.write(_SIGNATURE)
        for kind, data in chunks:
            f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit RGB non-interlaced PNG with row filters None, Sub or Up -> (H, W, 3) uint8."""
    chunks = _chunks(path)
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if (depth, color, interlace) != (8, 2, 0):
        raise ValueError(f"only 8-bit RGB non-interlaced PNGs are supported, got depth {depth}, colour type {color}")
    raw = zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * 3)
    out = np.empty((height, width * 3), np.uint8)
    previous = np.zeros(width * 3, np.uint8)
    for y, (kind, line) in enumerate(zip(rows[:, 0], rows[:, 1:])):
        if kind == 0:
            out[y] = line
        elif kind == 1:  # Sub: each byte adds the same channel of the pixel to its left
            out[y] = np.cumsum(line.reshape(width, 3), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up: each byte adds the byte above
            out[y] = line + previous
        else:
            raise ValueError(f"row filter {kind} is not supported")
        previous = out[y]
    return out.reshape(height, width, 3)


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG as keyword -> value."""
    pairs = (data.split(b"\0", 1) for kind, data in _chunks(path) if kind == b"tEXt")
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in pairs}


def label_colors(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 palette: black background, then saturated colours.

    Class i's colour does not depend on num_classes (hues step by the golden angle, brightness alternates),
    so the same class looks the same in every picture.
    """
    index = np.arange(1, num_classes)
    hue = (index * 0.618033988749895) % 1.0
    value = np.where(index % 2 == 1, 1.0, 0.75)
    colors = np.zeros((num_classes, 3), np.uint8)
    colors[1:] = np.round(_hsv_to_rgb(hue, 0.8, value) * 255)
    return colors


def preview(
    image: np.ndarray,
    label: np.ndarray,
    path: str | os.PathLike,
    alpha: float = 0.5,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    size: int = 256,
    percentiles: tuple[float, float] = (0.5, 99.5),
    names: Sequence[str] | None = None,
) -> None:
    """Save axial | coronal | sagittal slices of image with label overlaid in colour as one PNG.

    image: (X, Y, Z) float; label: (X, Y, Z) integer values (any dtype), 0 = background. Both have voxel
    axes increasing towards the patient's right, anterior and superior (RAS+, as
    ``nibabel.as_closest_canonical`` gives). The slices go through the centre of the bounding box of the
    labelled voxels (the volume centre when none). Radiological view: axial seen from the feet and
    coronal from the front (patient's right on the picture's left, anterior / superior up), sagittal
    with anterior on the left and superior up. Grey values are the image windowed to the given
    percentiles (of an evenly strided subsample of at most about 2M voxels); labelled pixels are
    ``(1 - alpha) * grey + alpha * colour``. Panels are resampled (nearest) to square pixels of the
    physical ``spacing`` in mm, the largest extent becoming ``size`` pixels. Class colours and the
    slice indices are stored in the PNG's tEXt chunks (``Labels``, ``Slices``). With ``names`` (class names,
    index = label value), a legend under the panels shows each class present in ``label``: its colour, then
    its name (white on black, wrapped to the panels' width).
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must be the same 3-D shape")
    # Percentiles of an evenly strided subsample (<= ~2M voxels) keep whole-body CTs cheap.
    stride = max(1, round((image.size / 2e6) ** (1 / 3)))
    low, high = np.percentile(image[::stride, ::stride, ::stride], percentiles)
    num_classes = int(label.max()) + 1 if label.size else 1
    colors = label_colors(max(num_classes, 2))

    labelled = label > 0
    if labelled.any():
        extents = (np.flatnonzero(labelled.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3))
        x, y, z = (int(e[0] + e[-1]) // 2 for e in extents)
    else:
        x, y, z = (n // 2 for n in label.shape)
    mm_per_pixel = max(n * s for n, s in zip(image.shape, spacing)) / size
    panels = []
    for cut, kept in ((np.s_[:, :, z], (0, 1)), (np.s_[:, y, :], (0, 2)), (np.s_[x, :, :], (1, 2))):
        # Reversing both in-plane axes and transposing puts patient-right / anterior / superior where the
        # radiological convention wants them (see the docstring) for all three planes of an RAS+ volume.
        g, lab = image[cut][::-1, ::-1].T, label[cut][::-1, ::-1].T
        shape = [max(1, round(image.shape[a] * spacing[a] / mm_per_pixel)) for a in kept[::-1]]
        g, lab = _resize_nearest(g, shape), _resize_nearest(lab, shape).astype(np.intp)
        g = np.round(np.clip((g - low) / max(high - low, 1e-12), 0, 1) * 255)
        rgb = np.repeat(g[..., None], 3, axis=2)
        mask = lab > 0
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colors[lab[mask]]
        panels.append(np.round(rgb).astype(np.uint8))
    text = {
        "Slices": f"x={x} y={y} z={z}",
        "Labels": " ".join(f"{k}:#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for k, c in enumerate(colors[1:num_classes], 1)),
    }
    picture = _side_by_side(panels, gap=4)
    if names is not None:
        present = [k for k in np.unique(label).astype(np.intp) if k > 0]
        picture = np.concatenate([picture, _legend([(str(names[k]) if k < len(names) else str(k), colors[k])
                                                    for k in present], picture.shape[1])])
    write_png(path, picture, text)


def plot_curves(
    series: dict[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    width: int = 640,
    height: int = 360,
) -> None:
    """Line plot of each named series of (x, y) points on a shared pair of axes, saved as a PNG.

    Draws a white canvas, an axes box with about 5 labelled round-valued ticks per axis, every series in its own colour
    (``label_colors`` order: the first series gets class 1's colour) and a legend row above the box.
    Non-finite points are skipped. The legend is also stored in the PNG's tEXt chunk ``Legend`` as
    ``name=#rrggbb`` entries separated by ``;``.
    """
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 64, width - 12, 24, height - 28
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"{width}x{height} is too small for a plot")
    colors = label_colors(len(series) + 1)[1:]
    points = {}
    for name, values in series.items():
        xy = np.asarray(values, dtype=np.float64).reshape(-1, 2)
        points[name] = xy[np.isfinite(xy).all(1)]
    everything = np.concatenate([p for p in points.values()] + [np.zeros((0, 2))])
    if len(everything):
        (x_lo, y_lo), (x_hi, y_hi) = everything.min(0), everything.max(0)
    else:
        x_lo, y_lo, x_hi, y_hi = 0.0, 0.0, 1.0, 1.0
    x_lo, x_hi = _widen(x_lo, x_hi, 0.0)
    y_lo, y_hi = _widen(y_lo, y_hi, 0.05)

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        col = left + (xy[:, 0] - x_lo) / (x_hi - x_lo) * (right - left)
        row = bottom - (xy[:, 1] - y_lo) / (y_hi - y_lo) * (bottom - top)
        return np.stack([row, col], 1)

    axis_color = (0, 0, 0)
    for value in _ticks(x_lo, x_hi):
        col = round(left + (value - x_lo) / (x_hi - x_lo) * (right - left))
        canvas[bottom : bottom + 4, col] = axis_color
        text = _format_number(value)
        _draw_text(canvas, text, bottom + 8, col - len(text) * 4 + 1, axis_color)
    for value in _ticks(y_lo, y_hi):
        row = round(bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top))
        canvas[row, left - 4 : left] = axis_color
        text = _format_number(value)
        _draw_text(canvas, text, row - 5, left - 7 - len(text) * 8, axis_color)
    canvas[[top, bottom], left : right + 1] = axis_color
    canvas[top : bottom + 1, [left, right]] = axis_color

    cursor = left
    for (name, xy), color in zip(points.items(), colors):
        if len(xy) == 1:
            xy = np.repeat(xy, 2, axis=0)
        if len(xy):
            _draw_polyline(canvas, to_pixels(xy), color, (top + 1, bottom - 1, left + 1, right - 1))
        canvas[6:16, cursor : cursor + 14] = color
        cursor = _draw_text(canvas, name, 6, cursor + 18, axis_color) + 16
    legend = ";".join(f"{name}=#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for name, c in zip(series, colors))
    write_png(path, canvas, {"Legend": legend})


def _chunks(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, CRC-checked."""
    with open(path, "rb") as f:
        blob = f.read()
    if not blob.startswith(_SIGNATURE):
        raise ValueError(f"{path} is not a PNG")
    chunks, at = [], len(_SIGNATURE)
    while at < len(blob):
        (length,) = struct.unpack(">I", blob[at : at + 4])
        kind, data = blob[at + 4 : at + 8], blob[at + 8 : at + 8 + length]
        if struct.unpack(">I", blob[at + 8 + length : at + 12 + length])[0] != zlib.crc32(kind + data):
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        chunks.append((kind, data))
        at += 12 + length
    return chunks


def _hsv_to_rgb(hue: np.ndarray, saturation: float, value: np.ndarray) -> np.ndarray:
    """hue (N,) in [0, 1), value (N,) -> (N, 3) floats in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    return value[:, None] * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def _resize_nearest(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a 2-D array to ``shape``, sampling at pixel centres."""
    rows = ((np.arange(shape[0]) + 0.5) * array.shape[0] / shape[0]).astype(int)
    cols = ((np.arange(shape[1]) + 0.5) * array.shape[1] / shape[1]).astype(int)
    return array[rows[:, None], cols[None, :]]


def _side_by_side(panels: list[np.ndarray], gap: int) -> np.ndarray:
    """Panels (H_i, W_i, 3) left to right on black, top-aligned, ``gap`` pixels apart."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.zeros((height, width, 3), np.uint8)
    col = 0
    for p in panels:
        out[: p.shape[0], col : col + p.shape[1]] = p
        col += p.shape[1] + gap
    return out


def _legend(entries: list[tuple[str, np.ndarray]], width: int) -> np.ndarray:
    """(H, width, 3) black rows holding each (name, colour) as a swatch then the name in white, left to right,
    wrapped to ``width``; no rows when ``entries`` is empty."""
    row_height, rows, cursor = 16, [[]], 4
    for name, color in entries:
        extent = 14 + 4 + len(name) * 8 + 12
        if cursor + extent > width and rows[-1]:
            rows.append([])
            cursor = 4
        rows[-1].append((cursor, name, color))
        cursor += extent
    out = np.zeros((row_height * len(rows) + 4 if entries else 0, width, 3), np.uint8)
    for r, row in enumerate(rows if entries else []):
        top = 4 + r * row_height
        for col, name, color in row:
            out[top : top + 10, col : col + 14] = color
            _draw_text(out, name, top, col + 18, (255, 255, 255))
    return out


def _widen(lo: float, hi: float, margin: float) -> tuple[float, float]:
    """Axis range with a relative margin, never empty."""
    if hi <= lo:
        half = max(abs(lo) * 0.5, 0.5)
        return lo - half, hi + half
    pad = (hi - lo) * margin
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
    """About ``target`` round tick values (multiples of 1, 2, 2.5 or 5 times a power of ten) in [lo, hi]."""
    raw = (hi - lo) / (target - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return first + step * np.arange(int((hi - first) / step + 1e-9) + 1)


def _format_number(value: float) -> str:
    text = f"{value:.3g}"
    return "0" if text.lstrip("-") in ("0", "0e+00") else text


def _draw_polyline(canvas: np.ndarray, rc: np.ndarray, color: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Two-pixel-wide lines through the (row, col) points rc: (N, 2), clipped to box (top, bottom, left, right)."""
    start, step = rc[:-1], np.diff(rc, axis=0)
    counts = np.ceil(np.abs(step).max(1)).astype(int) + 1
    segment = np.repeat(np.arange(len(step)), counts)
    t = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) / np.maximum(counts[segment] - 1, 1)
    pixels = np.round(start[segment] + t[:, None] * step[segment]).astype(int)
    pixels = np.concatenate([pixels, pixels + [1, 0], pixels + [0, 1]])
    top, bottom, left, right = box
    keep = (pixels[:, 0] >= top) & (pixels[:, 0] <= bottom) & (pixels[:, 1] >= left) & (pixels[:, 1] <= right)
    canvas[pixels[keep, 0], pixels[keep, 1]] = color


# 3x5 glyphs, rows top to bottom, "1" = ink.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "+": "000010111010000", ":": "000010000010000",
    "/": "001001010100100", "_": "000000000000111", ",": "000000000010100", "%": "101001010100101",
    "(": "010100100100010", ")": "010001001001010", " ": "000000000000000", "?": "111001010000010",
}


def _draw_text(canvas: np.ndarray, text: str, row: int, col: int, color: Sequence[int], scale: int = 2) -> int:
    """Draw text with its top-left corner at (row, col), clipped to the canvas; returns the end column."""
    for char in text.upper():
        glyph = np.array([int(b) for b in _FONT.get(char, _FONT["?"])], bool).reshape(5, 3)
        ink = np.argwhere(np.kron(glyph, np.ones((scale, scale), bool))) + [row, col]
        ink = ink[(ink >= 0).all(1) & (ink[:, 0] < canvas.shape[0]) & (ink[:, 1] < canvas.shape[1])]
        canvas[ink[:, 0], ink[:, 1]] = color
        col += 4 * scale
    return col
