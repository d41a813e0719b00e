"""mulmodseg.data.cache: the on-disk VolumeCache of preprocessed volumes, and load_training_volumes through it."""
import os

import numpy as np
from helpers import write_nifti

import mulmodseg.data.cache as cache_module
from mulmodseg.data import Case, VolumeCache, default_settings, load_training_volumes, preprocess

SMALL = {"min_size": [8, 8, 8]}


def _counting_preprocess(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return preprocess(*args, **kwargs)
    monkeypatch.setattr(cache_module, "preprocess", counted)
    return calls


def _small_case(tmp_path, value=100):
    rng = np.random.default_rng(value)
    img = write_nifti(tmp_path / "src" / "a.nii.gz", rng.integers(-200, 300, (12, 10, 8)).astype(np.int16),
                      np.diag([3.0, 3.0, 3.0, 1]))
    lab = write_nifti(tmp_path / "src" / "a_gt.nii.gz", (rng.random((12, 10, 8)) > 0.7).astype(np.uint8),
                      np.diag([3.0, 3.0, 3.0, 1]))
    return Case("a", img, lab, "CT")


def test_cache_hit_invalidation_and_recovery(tmp_path, monkeypatch):
    calls = _counting_preprocess(monkeypatch)
    case = _small_case(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    old_umask = os.umask(0o022)
    try:
        image, label, meta = cache.load(case, SMALL)
    finally:
        os.umask(old_umask)
    entry = tmp_path / "cache" / cache.key(case, SMALL)
    assert entry.stat().st_mode & 0o777 == 0o755  # a shared --cache_dir: others can read the entry
    expected_image, expected_label, expected_meta = preprocess(case.image, case.label, "CT", **SMALL)
    assert len(calls) == 1 and isinstance(image, np.memmap) and isinstance(label, np.memmap)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert meta == expected_meta

    again = cache.load(case, dict(SMALL))
    assert len(calls) == 1 and np.array_equal(again[0], image) and again[2] == meta
    assert cache.load(case, {**default_settings("CT"), **SMALL})[2] == meta and len(calls) == 1

    cache.load(case, {**SMALL, "spacing": [3.0, 3.0, 3.0]})  # changed setting -> new entry
    assert len(calls) == 2
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2 and not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]

    _small_case(tmp_path, value=7)  # same paths, new contents -> new entry
    changed = cache.load(case, SMALL)
    assert len(calls) == 3 and not np.array_equal(changed[0], image)
    expected_changed = np.array(changed[0])  # a copy: the test truncates the mapped file in place

    entry = tmp_path / "cache" / cache.key(case, SMALL)
    npy = entry / "image.npy"
    npy.write_bytes(npy.read_bytes()[:-100])  # truncated by a crash or a full disk
    recovered = cache.load(case, SMALL)
    assert len(calls) == 4 and np.array_equal(recovered[0], expected_changed)
    (entry / "meta.json").write_text('{"arrays": {"image"')  # half-written meta
    assert np.array_equal(cache.load(case, SMALL)[0], expected_changed) and len(calls) == 5
    (entry / "meta.json").unlink()
    assert np.array_equal(cache.load(case, SMALL)[0], expected_changed) and len(calls) == 6
    assert len(cache.load(case, SMALL)) == 3 and len(calls) == 6


def test_load_training_volumes_through_cache(tmp_path, monkeypatch):
    calls = _counting_preprocess(monkeypatch)
    case = _small_case(tmp_path)
    unlabelled = Case("b", case.image, None, "MR")
    cache = VolumeCache(tmp_path / "cache")
    volumes = load_training_volumes([case, unlabelled], SMALL, cache)
    assert len(calls) == 2 and volumes[1][1] is None
    assert volumes[0][0].dtype == np.float32 and volumes[0][1].dtype == np.uint8
    again = load_training_volumes([case, unlabelled], SMALL, cache)
    assert len(calls) == 2 and np.array_equal(again[0][0], volumes[0][0])
    direct = load_training_volumes([case], SMALL, None)
    assert np.array_equal(direct[0][1], volumes[0][1])
    defaults = load_training_volumes([case], None, None)  # default_settings per modality: padded to 96^3
    assert defaults[0][0].shape == (96, 96, 96)
