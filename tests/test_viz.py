"""PNG writer/reader, palette, label previews and curve plots."""

import struct
import zlib

import numpy as np
import pytest

from mulmodseg.viz import label_colors, plot_curves, preview, read_png, read_png_text, write_png


def _chunk_list(blob):
    chunks, at = [], 8
    while at < len(blob):
        (length,) = struct.unpack(">I", blob[at : at + 4])
        chunks.append((blob[at + 4 : at + 8], blob[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def test_png_round_trip_and_raw_structure(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    write_png(path, rgb, {"Comment": "hello"})
    np.testing.assert_array_equal(read_png(path), rgb)
    assert read_png_text(path) == {"Comment": "hello"}

    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = _chunk_list(blob)
    assert [kind for kind, _ in chunks] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (11, 7, 8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(chunks[2][1]), np.uint8).reshape(7, 1 + 11 * 3)
    assert (raw[:, 0] == 0).all()  # filter type 0 on every row
    np.testing.assert_array_equal(raw[:, 1:].reshape(7, 11, 3), rgb)


def test_reader_undoes_sub_and_up_filters(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    flat = rgb.reshape(3, 12).astype(np.int64)
    sub = flat.copy()
    sub[0, 3:] = (flat[0, 3:] - flat[0, :-3]) % 256
    up = (flat[1] - flat[0]) % 256
    lines = [bytes([1]) + bytes(sub[0].tolist()), bytes([2]) + bytes(up.tolist()), bytes([0]) + bytes(flat[2].tolist())]
    ihdr = struct.pack(">IIBBBBB", 4, 3, 8, 2, 0, 0, 0)
    body = b""
    for kind, data in ((b"IHDR", ihdr), (b"IDAT", zlib.compress(b"".join(lines))), (b"IEND", b"")):
        body += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path = tmp_path / "f.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    np.testing.assert_array_equal(read_png(path), rgb)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # corrupt the IEND CRC
    with pytest.raises(ValueError):
        read_png(path)


def test_write_png_rejects_wrong_input(tmp_path):
    with pytest.raises(ValueError):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_label_colors():
    colors = label_colors(15)
    assert colors.shape == (15, 3) and colors.dtype == np.uint8
    assert (colors[0] == 0).all()
    assert len({tuple(c) for c in colors}) == 15  # all distinct
    assert (colors[1:].max(1).astype(int) - colors[1:].min(1) > 100).all()  # saturated, far from grey
    np.testing.assert_array_equal(label_colors(4), colors[:4])  # class colours do not depend on K


def test_preview_size_orientation_and_colours(tmp_path):
    shape = (20, 16, 12)
    image = np.random.default_rng(2).normal(size=shape)
    label = np.zeros(shape, np.uint8)
    label[2:6, 10:14, 3:9] = 1  # patient's left (low x), anterior (high y)
    label[3:5, 11:13, 5:7] = 2
    path = tmp_path / "p.png"
    preview(image, label, path, spacing=(1.0, 1.0, 2.0), size=40)
    rgb = read_png(path).astype(int)
    # mm_per_pixel = max(20, 16, 24) mm / 40 = 0.6: axial 20x16 mm -> 33x27 px (W x H), coronal 20x24 mm
    # -> 33x40, sagittal 16x24 mm -> 27x40; panels side by side, 4 px apart.
    assert rgb.shape == (40, 33 + 4 + 33 + 4 + 27, 3)
    axial = rgb[:27, :33]
    coloured = axial.max(2) != axial.min(2)
    assert coloured.any() and ((coloured.sum(0) > 0).nonzero()[0] > 16).all()  # patient's left: picture right
    assert ((coloured.sum(1) > 0).nonzero()[0] < 13).all()  # anterior: top half
    grey = rgb[rgb.max(2) == rgb.min(2)]
    assert len(grey) > 0.8 * rgb.shape[0] * rgb.shape[1]  # everything else is grey (or the black gaps)
    colors = label_colors(3)
    text = read_png_text(path)
    assert text["Slices"] == "x=3 y=11 z=5"
    assert text["Labels"] == " ".join(f"{k}:#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for k, c in enumerate(colors[1:], 1))


def test_preview_blend_values(tmp_path):
    image = np.zeros((4, 4, 4))
    image[0] = 1.0
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 1
    path = tmp_path / "b.png"
    preview(image, label.astype(np.float32), path, alpha=0.25, size=4, percentiles=(0, 100))  # float labels
    rgb = read_png(path)
    axial = rgb[:4, :4]
    expected = np.round(0.75 * 0 + 0.25 * label_colors(2)[1].astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(axial[1, 1], expected)  # labelled voxel over black
    np.testing.assert_array_equal(axial[0, 3], [255, 255, 255])  # x=0 (patient's left) on the right, image 1.0
    np.testing.assert_array_equal(axial[0, 0], [0, 0, 0])


def test_preview_without_labels_uses_volume_centre(tmp_path):
    path = tmp_path / "e.png"
    preview(np.arange(6 * 8 * 10, dtype=float).reshape(6, 8, 10), np.zeros((6, 8, 10)), path, size=10)
    rgb = read_png(path)
    assert (rgb.max(2) == rgb.min(2)).all()
    assert read_png_text(path)["Slices"] == "x=3 y=4 z=5"


def test_plot_curves(tmp_path):
    series = {
        "CT loss": [(i, 2.0 * 0.9**i) for i in range(30)],
        "MR loss": [(i, 1.5 * 0.92**i) for i in range(30)],
        "val dice": [(5, 0.2), (10, float("nan")), (15, 0.6), (25, 0.8)],
    }
    path = tmp_path / "c.png"
    plot_curves(series, path, width=320, height=200)
    rgb = read_png(path)
    assert rgb.shape == (200, 320, 3)
    colors = label_colors(4)[1:]
    box = rgb[24:173, 64:309]  # plot area of a 320x200 canvas, frame included
    assert (box[0] == 0).all() and (box[-1] == 0).all() and (box[:, 0] == 0).all() and (box[:, -1] == 0).all()
    for color in colors:
        assert (box[1:-1, 1:-1] == color).all(2).sum() > 30  # the curve itself, not only its legend swatch
    assert (rgb == 255).all(2).mean() > 0.6  # mostly white canvas
    legend = read_png_text(path)["Legend"].split(";")
    assert legend == [f"{n}=#{c[0]:02x}{c[1]:02x}{c[2]:02x}" for n, c in zip(series, colors)]


def test_plot_curves_degenerate_inputs(tmp_path):
    path = tmp_path / "d.png"
    plot_curves({"one point": [(3, 1.0)], "empty": []}, path, width=200, height=120)
    rgb = read_png(path)
    assert rgb.shape == (120, 200, 3)
    assert (rgb[25:92, 65:188] == label_colors(2)[1]).all(2).sum() >= 3  # the lone point, inside the box


def test_preview_legend_names_the_classes_present(tmp_path):
    shape = (20, 16, 12)
    image = np.random.default_rng(3).normal(size=shape)
    label = np.zeros(shape, np.uint8)
    label[2:6, 10:14, 3:9] = 1
    label[12:16, 2:6, 3:9] = 3  # class 2 absent
    plain, legend = tmp_path / "plain.png", tmp_path / "legend.png"
    preview(image, label, plain, spacing=(1.0, 1.0, 2.0), size=40)
    preview(image, label, legend, spacing=(1.0, 1.0, 2.0), size=40, names=["background", "spleen", "kidney", "liver"])
    top, rgb = read_png(plain), read_png(legend)
    # 40 px of panels; "spleen" (18 + 6 * 8 + 12 px) and "liver" do not fit the 101 px together: two rows.
    assert rgb.shape == (40 + 2 * 16 + 4, 101, 3)
    np.testing.assert_array_equal(rgb[:40], top)  # the panels are unchanged
    colors = label_colors(4)
    below = rgb[40:]
    np.testing.assert_array_equal(below[4:14, 4:18], np.broadcast_to(colors[1], (10, 14, 3)))  # row 1: spleen
    np.testing.assert_array_equal(below[20:30, 4:18], np.broadcast_to(colors[3], (10, 14, 3)))  # row 2: liver
    assert not (below == colors[2]).all(2).any()  # the absent class has no swatch
    white = (below == 255).all(2)
    assert white[4:14, 22:22 + 6 * 8].sum() > 50 and white[20:30, 22:22 + 5 * 8].sum() > 40  # the names, in white
    assert not white[:, 22 + 6 * 8:].any()  # nothing past the longest name
