"""mulmodseg.data.geometry: separable resampling against scipy's map_coordinates, in any memory layout."""
import numpy as np
import pytest


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "permuted"])
def test_resample_equals_map_coordinates_in_any_memory_layout(layout):
    from scipy.ndimage import map_coordinates

    from mulmodseg.data.geometry import resample
    rng = np.random.default_rng(0)
    array = rng.random((20, 15, 10)).astype(np.float32)
    positions = [np.sort(rng.uniform(0, n - 1, m)) for n, m in ((20, 13), (15, 22), (10, 7))]
    ref_linear = map_coordinates(array.astype(np.float64), np.meshgrid(*positions, indexing="ij"), order=1)
    ref_nearest = array[np.ix_(*[np.floor(p + 0.5).astype(int) for p in positions])]
    stored = {"C": array, "F": np.asfortranarray(array), "flipped": array[::-1, ::-1].copy()[::-1, ::-1],
              "permuted": array.transpose(2, 0, 1).copy().transpose(1, 2, 0)}[layout]
    np.testing.assert_allclose(resample(stored, positions, 1), ref_linear, atol=1e-6)
    np.testing.assert_array_equal(resample(stored, positions, 0), ref_nearest)
    np.testing.assert_array_equal(resample(stored, positions, 1), resample(array, positions, 1))
