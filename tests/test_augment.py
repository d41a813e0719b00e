"""mulmodseg.augment: nnU-Net's augmentation, batched. Shapes, exact centre crops, the sampling geometry
(against a numpy trilinear reference), label/image alignment, no labels invented at the border, the
probability of each transform, determinism per key, mirroring that keeps the classes, and each intensity
transform against its formula."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mulmodseg.augment import NnUNetAugment, augment_batch, draw_params, input_size, rotation_matrix
from mulmodseg.intensity import gaussian_blur, low_resolution_matrix, simulate_low_resolution

OFF = NnUNetAugment.off()


def only(**changes) -> NnUNetAugment:
    """All transforms off except the given settings."""
    return OFF.with_overrides(changes)


def keys(n: int, *prefix: int) -> list:
    return [(*prefix, i) for i in range(n)]


def random_batch(b: int, size, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 1, *size), generator=g), torch.randint(0, classes, (b, 1, *size), generator=g)


def centre(x: torch.Tensor, out) -> torch.Tensor:
    start = [(i - o) // 2 for i, o in zip(x.shape[2:], out)]
    return x[(slice(None), slice(None), *(slice(s, s + o) for s, o in zip(start, out)))]


# --- settings -------------------------------------------------------------------------------------------

def test_defaults_are_nnunets_and_overrides_check_names_and_values():
    s = NnUNetAugment()
    assert (s.rotation_p, s.rotation_p_per_axis, s.rotation_degrees, s.scale_p, s.scale_range) == \
        (0.2, 1.0, 30.0, 0.2, (0.7, 1.4))
    assert (s.noise_p, s.noise_std_range, s.blur_p, s.blur_p_per_channel, s.blur_sigma_range) == \
        (0.1, (0.0, 0.1), 0.2, 0.5, (0.5, 1.0))
    assert (s.brightness_p, s.brightness_range, s.contrast_p, s.contrast_range) == \
        (0.15, (0.75, 1.25), 0.15, (0.75, 1.25))
    assert (s.lowres_p, s.lowres_p_per_channel, s.lowres_zoom_range) == (0.25, 0.5, (0.5, 1.0))
    assert (s.gamma_inverted_p, s.gamma_p, s.gamma_range, s.gamma_retain_stats) == (0.1, 0.3, (0.7, 1.5), True)
    assert (s.mirror_p, s.mirror_axes, s.inplane_axis, s.label_mode) == (0.5, (0, 1, 2), None, "nearest")

    o = NnUNetAugment.from_overrides("rotation_p=0.3, scale_range=0.8:1.25,mirror_axes=0:1,inplane_axis=2,"
                                     "gamma_retain_stats=false,label_mode=linear")
    assert (o.rotation_p, o.scale_range, o.mirror_axes, o.inplane_axis, o.gamma_retain_stats, o.label_mode) == \
        (0.3, (0.8, 1.25), (0, 1), 2, False, "linear")
    assert NnUNetAugment.from_overrides("mirror_axes=").mirror_axes == ()
    assert NnUNetAugment(**o.to_dict()) == o  # what config.json / a checkpoint saves reads back
    assert all(getattr(NnUNetAugment.off(), n) == 0 for n in s.to_dict() if n.endswith("_p"))
    for text, field in [("rotaton_p=0.1", "rotaton_p"), ("rotation_p=1.5", "rotation_p"),
                        ("scale_range=1", "scale_range"), ("scale_range=1.2:0.8", "scale_range"),
                        ("noise_p=x", "noise_p"), ("mirror_axes=0:3", "mirror_axes"),
                        ("lowres_zoom_range=0.5:2", "lowres_zoom_range"), ("label_mode=cubic", "label_mode"),
                        ("gamma_retain_stats=2", "gamma_retain_stats"), ("inplane_axis=1.5", "inplane_axis"),
                        ("scale_range=0:1", "scale_range"), ("rotation_p", "rotation_p")]:
        with pytest.raises(ValueError, match=field):
            NnUNetAugment.from_overrides(text)


def test_input_size_covers_every_rotation_and_keeps_parity():
    s = NnUNetAugment()
    assert input_size((64, 64, 64), OFF) == (64, 64, 64)
    size = input_size((24, 25, 24), s)
    assert all((i - o) % 2 == 0 and i > o for i, o in zip(size, (24, 25, 24)))
    assert input_size((64, 64, 64), s.with_overrides({"inplane_axis": 2}))[2] == 64
    # every tap of every output voxel inside the input: a ones image stays exactly 1 under any rotation
    for settings, scale in [(only(rotation_p=1.0), 1.0), (only(rotation_p=1.0, scale_p=1.0), 1.4)]:
        size = input_size((16, 16, 16), settings, scale)
        ones = torch.ones((64, 1, *size))
        out, lab = augment_batch(ones, torch.ones_like(ones, dtype=torch.long), keys(64, 7), settings, (16, 16, 16))
        assert torch.allclose(out, torch.ones_like(out), atol=1e-5) and bool((lab == 1).all())


# --- shapes, centre crops, geometry ---------------------------------------------------------------------

def test_shapes_dtypes_and_no_op_settings_give_the_exact_centre_crop():
    image, label = random_batch(3, (21, 20, 19))
    for lab in (label, label.to(torch.uint8), label.to(torch.int16), label.to(torch.int32)):
        out_image, out_label = augment_batch(image, lab, keys(3), NnUNetAugment(), (16, 15, 16))
        assert out_image.shape == out_label.shape == (3, 1, 16, 15, 16)
        assert out_image.dtype == torch.float32 and out_label.dtype == lab.dtype
    out_image, out_label = augment_batch(image, label, keys(3), OFF, (16, 15, 16))
    assert torch.equal(out_image, centre(image, (16, 15, 16))) and torch.equal(out_label, centre(label, (16, 15, 16)))
    # mirrored rows without a spatial transform are flipped slices, bit for bit
    mirrored = only(mirror_p=1.0)
    out_image, out_label = augment_batch(image, label, keys(3), mirrored, (16, 15, 16))
    assert torch.equal(out_image, centre(image, (16, 15, 16)).flip((2, 3, 4)))
    assert torch.equal(out_label, centre(label, (16, 15, 16)).flip((2, 3, 4)))
    with pytest.raises(ValueError, match="keys"):
        augment_batch(image, label, keys(2), OFF, (16, 15, 16))
    with pytest.raises(ValueError, match="out_size"):
        augment_batch(image, label, keys(3), OFF, (22, 15, 16))


def trilinear(volume: np.ndarray, q: np.ndarray) -> float:
    """Trilinear value of `volume` at index position q, zero outside (the reference for grid_sample)."""
    base = np.floor(q).astype(int)
    value = 0.0
    for corner in np.ndindex(2, 2, 2):
        idx = base + corner
        weight = np.prod(1 - np.abs(q - idx))
        if all(0 <= i < s for i, s in zip(idx, volume.shape)):
            value += weight * volume[tuple(idx)]
    return value


def test_warped_rows_sample_centre_plus_rotated_scaled_offsets_in_ras_axis_order():
    """The grid_sample trap: the grid's last dim is (Z, Y, X). Output voxel p must read input position
    c + R diag(s) F (p - (out - 1) / 2), with R = R2 R1 R0 about axes 0, 1, 2 and F the mirror."""
    settings = only(rotation_p=1.0, scale_p=1.0, mirror_p=0.5)
    in_size, out = (20, 18, 16), (10, 9, 8)
    image, label = random_batch(4, in_size)
    out_image, out_label = augment_batch(image, label, keys(4, 3), settings, out, label_fill=-1)
    params = draw_params(keys(4, 3), settings)
    c = np.array([(i - o) // 2 for i, o in zip(in_size, out)]) + (np.array(out) - 1) / 2
    rng = np.random.default_rng(0)
    for row in range(4):
        a = (rotation_matrix(params.angles[row]) @ np.diag(params.scale[row])
             @ np.diag(np.where(params.flip[row], -1, 1)))
        for p in rng.integers(0, out, (20, 3)):
            q = c + a @ (p - (np.array(out) - 1) / 2)
            assert out_image[row, 0, p[0], p[1], p[2]].item() == pytest.approx(trilinear(image[row, 0].numpy(), q),
                                                                                abs=1e-5)
            # the label of the nearest input voxel, or the fill where most of the trilinear weight is outside
            inside = np.prod(np.clip(np.minimum(q + 1, np.array(in_size) - q), 0, 1)) >= 0.5
            nearest = tuple(np.rint(q).astype(int))
            assert out_label[row, 0, p[0], p[1], p[2]].item() == (label[row, 0][nearest].item() if inside else -1)
    # rotation about axis 2 by +90 degrees maps axis 0 onto axis 1 (the right-hand rule in RAS)
    assert np.allclose(rotation_matrix([0, 0, math.pi / 2]) @ [1, 0, 0], [0, 1, 0])


def sphere(size, centre_at, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1)
    return (np.linalg.norm(grid - np.asarray(centre_at), axis=-1) <= radius)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_label_stays_on_the_image_under_any_rotation_and_scale(mode):
    settings = only(rotation_p=1.0, scale_p=1.0, mirror_p=0.5, label_mode=mode)
    # off-centre, radius 11 voxels (7.9 after the largest zoom-out: nearest labels differ from the thresholded
    # trilinear image by a thin shell, so the Dice bound needs a sphere this large)
    ball = torch.from_numpy(sphere((44, 44, 44), (24, 20, 23), 11.0))[None, None].repeat(32, 1, 1, 1, 1)
    out_image, out_label = augment_batch(ball.float(), ball.long(), keys(32, 11), settings, (36, 36, 36))
    grid = np.stack(np.meshgrid(*[np.arange(36)] * 3, indexing="ij"), -1)
    for img, lab in zip(out_image[:, 0].numpy(), out_label[:, 0].numpy()):
        seen = img > 0.5
        dice = 2 * (seen & (lab == 1)).sum() / (seen.sum() + (lab == 1).sum())
        assert dice >= 0.98
        assert np.linalg.norm(grid[lab == 1].mean(0) - grid[seen].mean(0)) <= 1.0


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_no_labels_are_invented_where_the_image_is_padding(mode):
    settings = only(rotation_p=1.0, label_mode=mode)  # rotations up to 30 degrees about every axis
    size = (16, 16, 16)
    image, label = torch.ones((8, 1, *size)), torch.full((8, 1, *size), 2)  # class 2 everywhere, no background
    for fill in (0, 255):
        out_image, out_label = augment_batch(image, label, keys(8, 5), settings, size, label_fill=fill)
        assert set(out_label.unique().tolist()) == {fill, 2}
        # the fill lies exactly where more than half of the image's trilinear weight fell outside the input
        assert torch.equal(out_label == fill, out_image < 0.5)


# --- probabilities and determinism ------------------------------------------------------------------------

def test_each_transform_fires_with_its_probability():
    s = NnUNetAugment()
    n = 2000
    p = draw_params(keys(n, 1, 2, 3), s)
    expected = {"rotate": (p.rotate, 0.2), "scale": ((p.scale != 1).all(1), 0.2), "spatial": (p.spatial, 0.36),
                "flip0": (p.flip[:, 0], 0.5), "flip1": (p.flip[:, 1], 0.5), "flip2": (p.flip[:, 2], 0.5),
                "noise": (p.noise, 0.1), "blur": (p.blur, 0.2 * 0.5), "brightness": (p.brightness, 0.15),
                "contrast": (p.contrast, 0.15), "lowres": (p.lowres, 0.25 * 0.5),
                "gamma_inverted": (p.gamma_inverted, 0.1), "gamma": (p.gamma, 0.3),
                "brightness < 1": (p.brightness_factor < 1, 0.5), "gamma < 1": (p.gamma_value < 1, 0.5)}
    for name, (hits, prob) in expected.items():
        assert abs(hits.mean() - prob) <= 4 * math.sqrt(prob * (1 - prob) / n), name
    assert np.abs(p.angles).max() <= math.radians(30) and (p.angles[~p.rotate] == 0).all()
    assert 0.7 <= p.scale.min() and p.scale.max() <= 1.4 and (p.scale == p.scale[:, :1]).all()  # isotropic
    assert 0.75 <= p.brightness_factor.min() and p.brightness_factor.max() <= 1.25
    assert 0.5 <= p.blur_sigma.min() and p.blur_sigma.max() <= 1.0 and 0.5 <= p.lowres_zoom.min()
    assert (p.angles[p.rotate] != 0).all()  # nnU-Net: a rotation turns about every axis
    half = draw_params(keys(n, 1, 2, 3), s.with_overrides({"rotation_p_per_axis": 0.5}))
    kept = half.angles[half.rotate] != 0
    assert abs(kept.mean() - 0.5) <= 4 * math.sqrt(0.25 / kept.size)
    # a probability changes only its own transform's draws
    q = draw_params(keys(n, 1, 2, 3), s.with_overrides({"rotation_p": 0.9}))
    assert (q.noise == p.noise).all() and (q.scale == p.scale).all() and q.rotate.mean() > 0.85
    # anisotropic crops: rotation about the given axis only, no scaling or zoom along it
    a = draw_params(keys(200), only(rotation_p=1.0, scale_p=1.0, inplane_axis=2))
    assert (a.angles[:, :2] == 0).all() and (a.scale[:, 2] == 1).all() and (a.lowres_zoom[:, 2] == 1).all()


def everything_on() -> NnUNetAugment:
    on = {n: 1.0 for n in NnUNetAugment().to_dict() if n.endswith(("_p", "_per_channel"))}
    return NnUNetAugment(**{**on, "mirror_p": 0.5})


@pytest.mark.parametrize("settings", [NnUNetAugment(), everything_on()], ids=["nnunet", "all-on"])
def test_same_keys_same_output_and_rows_do_not_depend_on_each_other(settings):
    image, label = random_batch(4, (20, 20, 20))
    ks = keys(4, 9, 9)
    first = augment_batch(image.clone(), label.clone(), ks, settings, (16, 16, 16))
    again = augment_batch(image.clone(), label.clone(), ks, settings, (16, 16, 16))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other_image, other_label = random_batch(3, (20, 20, 20), seed=1)
    mixed = augment_batch(torch.cat([other_image[:1], image[2:3], other_image[1:2]]),
                          torch.cat([other_label[:1], label[2:3], other_label[1:2]]),
                          [(1, 2), ks[2], (3, 4)], settings, (16, 16, 16))
    alone = augment_batch(image[2:3].clone(), label[2:3].clone(), [ks[2]], settings, (16, 16, 16))
    for out in (mixed, alone):
        row = 1 if out is mixed else 0
        assert torch.equal(out[0][row], first[0][2]) and torch.equal(out[1][row], first[1][2])
    assert not torch.equal(first[0][0], first[0][1])  # different keys, different draws


# --- mirroring ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("warp", [False, True], ids=["slice", "grid"])
def test_a_mirror_flips_the_label_with_the_image_and_keeps_its_classes(warp):
    """As nnU-Net: a right kidney mirrored to the other side is still labelled right kidney, so the anatomy around
    it (the liver's side) keeps telling the network which kidney it is."""
    size = (12, 10, 8)
    label = torch.zeros((1, 1, *size), dtype=torch.long)
    label[..., :6, :, :] = 1  # "right" organ on one side of axis 0, "left" organ (2) on the other
    label[..., 6:, :, :] = 2
    label[..., 0, 0, 0] = 3
    label[..., 1, 1, 1], label[..., 2, 2, 2] = -1, 200  # an ignore index and a large value pass unchanged
    image = label.float() / 3
    extra = {"rotation_p": 1.0, "rotation_degrees": 0.0} if warp else {}  # identity warp: flip folded in the grid
    for axis in (0, 1, 2):
        settings = only(mirror_p=1.0, mirror_axes=(axis,), **extra)
        out_image, out_label = augment_batch(image, label, [(0,)], settings, size)
        assert torch.equal(out_label, label.flip(2 + axis))
        assert torch.allclose(out_image, image.flip(2 + axis), atol=1e-4)  # float32 grid, values up to 67


# --- intensity transforms against their formulas ----------------------------------------------------------

def one_row(settings: NnUNetAugment, key=(4, 2)):
    image = torch.rand((1, 1, 12, 12, 12), generator=torch.Generator().manual_seed(3)) * 2 - 0.5
    out, _ = augment_batch(image.clone(), torch.zeros_like(image, dtype=torch.long), [key], settings, (12, 12, 12))
    return image[0, 0].double(), out[0, 0].double(), draw_params([key], settings)


def test_brightness_multiplies():
    x, y, p = one_row(only(brightness_p=1.0))
    assert torch.allclose(y, x * p.brightness_factor[0], atol=1e-6) and p.brightness_factor[0] != 1


def test_contrast_scales_around_the_mean_and_clips_to_the_old_range():
    for key in [(1,), (2,), (3,), (4,)]:
        x, y, p = one_row(only(contrast_p=1.0), key)
        f = p.contrast_factor[0]
        assert torch.allclose(y, ((x - x.mean()) * f + x.mean()).clamp(x.min(), x.max()), atol=1e-5)
        assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6


@pytest.mark.parametrize("inverted", [False, True])
def test_gamma_keeps_mean_and_std(inverted):
    settings = only(gamma_inverted_p=1.0) if inverted else only(gamma_p=1.0)
    x, y, p = one_row(settings)
    g = p.gamma_inverted_value[0] if inverted else p.gamma_value[0]
    z = -x if inverted else x
    ref = ((z - z.min()) / (z.max() - z.min())) ** g * (z.max() - z.min()) + z.min()
    ref = (ref - ref.mean()) / ref.std() * z.std() + z.mean()
    assert torch.allclose(y, -ref if inverted else ref, atol=1e-5)
    assert y.mean().item() == pytest.approx(x.mean().item(), abs=1e-5)
    assert y.std().item() == pytest.approx(x.std().item(), rel=1e-5)
    x, y, p = one_row(only(gamma_p=1.0, gamma_retain_stats=False))  # the plain formula keeps min and max
    ref = ((x - x.min()) / (x.max() - x.min())) ** p.gamma_value[0] * (x.max() - x.min()) + x.min()
    assert torch.allclose(y, ref, atol=1e-5)


def test_noise_has_the_drawn_standard_deviation():
    image = torch.zeros((6, 1, 32, 32, 32))
    out, _ = augment_batch(image, torch.zeros_like(image, dtype=torch.long), keys(6, 8), only(noise_p=1.0), (32,) * 3)
    p = draw_params(keys(6, 8), only(noise_p=1.0))
    for row in range(6):
        assert out[row].std().item() == pytest.approx(p.noise_std[row], rel=0.03)
        assert abs(out[row].mean().item()) < 4 * p.noise_std[row] / math.sqrt(32 ** 3)


def test_blur_matches_a_separable_gaussian_with_reflected_borders():
    x, y, p = one_row(only(blur_p=1.0, blur_p_per_channel=1.0))
    ref = x[None, None]
    for axis, sigma in enumerate(p.blur_sigma[0]):
        taps = torch.arange(-3, 4, dtype=torch.float64)
        k = torch.exp(-0.5 * (taps / sigma) ** 2)
        k = (k / k.sum()).view([1, 1] + [7 if a == axis else 1 for a in range(3)])
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 3
        ref = F.conv3d(F.pad(ref, pad, mode="reflect"), k)
    assert torch.allclose(y, ref[0, 0], atol=1e-5)
    assert 0.5 <= p.blur_sigma.min() and p.blur_sigma.max() <= 1.0
    constant = torch.full((5, 6, 7), 0.3)  # taps sum to 1, the reflected border adds nothing
    assert torch.allclose(gaussian_blur(constant, [0.5, 0.7, 1.0], 3), constant, atol=1e-7)


@pytest.mark.parametrize("zoom", [0.5, 0.62, 0.77, 0.93])
def test_low_resolution_equals_nearest_down_then_trilinear_up(zoom):
    x = torch.rand((13, 16, 11), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    small = [round(s * zoom) for s in x.shape]
    ref = F.interpolate(F.interpolate(x[None, None], small, mode="nearest-exact"), x.shape, mode="trilinear")[0, 0]
    assert torch.allclose(simulate_low_resolution(x, [zoom] * 3), ref, atol=1e-10)
    assert np.allclose(low_resolution_matrix(16, zoom).sum(1), 1.0)
    x_, y, p = one_row(only(lowres_p=1.0, lowres_p_per_channel=1.0))
    assert torch.allclose(y, simulate_low_resolution(x_, p.lowres_zoom[0]), atol=1e-5)
