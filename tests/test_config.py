"""A run's settings (mulmodseg.config): every bad setting at once, fold flags, resumed settings, saved ones."""

import dataclasses
import re

import pytest

from mulmodseg.config import TrainConfig, TrainingError, check_config, resumed_config, saved_config
from mulmodseg.data import DataError


def format_1(train: dict) -> dict:
    """The part of a format-1 checkpoint that ``saved_config`` reads, its run's settings ``train``."""
    return {"format_version": 1, "config": {"train": train}}


def test_check_config_lists_every_bad_setting_at_once():
    check_config(TrainConfig(data_dirs={"CT": "x"}))
    check_config(TrainConfig(data_dirs={"CT": "x"}, backbone="swinunetr", roi_size=(64, 96, 128)))
    bad = TrainConfig(data_dirs={"CT": "x"}, roi_size=(36, 32, 32), save_every=0, log_every=0, val_every=5,
                      max_cases={"ct": 3}, fov_prob=-0.1, fov_min=0.0, remap_prob=1.5)
    with pytest.raises(TrainingError) as err:
        check_config(bad)
    message = str(err.value)
    assert message.startswith("8 setting problem(s)")
    for part in ("--save_every must be > 0, got 0", "--log_every must be > 0, got 0",
                 "--fov_prob must be in [0, 1], got -0.1", "--fov_min must be in (0, 1], got 0.0",
                 "--remap_prob must be in [0, 1], got 1.5",
                 "--roi_size 36 32 32: --backbone unet needs multiples of 8, e.g. 32 32 32",
                 "--val_every 5 has nothing to validate on: also pass --val_fraction",
                 "--max_cases ct=3: no modality 'ct' in this run (['CT'])"):
        assert part in message
    with pytest.raises(TrainingError, match="--backbone swinunetr needs multiples of 32, e.g. 64 64 64"):
        check_config(dataclasses.replace(bad, backbone="swinunetr", roi_size=(48, 64, 64), save_every=1,
                                         log_every=1, val_every=0, max_cases={}, fov_prob=0.3, fov_min=0.2,
                                         remap_prob=0.3))


def test_resumed_config_applies_resumable_settings_and_refuses_the_rest():
    saved = TrainConfig(data_dirs={"CT": "a"}, epochs=2, roi_size=(32, 32, 32), out="runs/x")
    given = TrainConfig(data_dirs={"CT": "a"}, epochs=4, roi_size=(64, 64, 64), out="runs/y", lr=0.5)
    resumed = resumed_config(saved, given, {"epochs"})
    assert (resumed.epochs, resumed.out, resumed.roi_size, resumed.lr) == (4, "runs/y", (32, 32, 32), 1e-3)
    every = {f.name for f in dataclasses.fields(TrainConfig)}
    assert resumed_config(saved, saved, every) == saved  # the original command again, plus --resume
    with pytest.raises(TrainingError, match=r"cannot change mid-run: lr: saved 0.001, given 0.5; "
                                            r"roi_size: saved \(32, 32, 32\), given \(64, 64, 64\)"):
        resumed_config(saved, given, every)


def test_configs_of_older_versions_keep_their_warp_probability():
    assert saved_config(format_1({"epochs": 3})).warp_prob == 0.5  # the warp shared aug_prob then
    assert TrainConfig.from_dict(dataclasses.asdict(TrainConfig())).warp_prob == 1.0


def test_fold_flags_that_cannot_work_are_refused_before_any_data_is_read(tmp_path):
    base = TrainConfig(data_dirs={"CT": "x"})
    check_config(dataclasses.replace(base, fold=4))  # of the default 5
    check_config(dataclasses.replace(base, fold=1, num_folds=2, val_every=1))  # the fold is the validation set
    bad = dataclasses.replace(base, fold=2, num_folds=2, val_fraction=0.2, splits=str(tmp_path / "none.json"))
    with pytest.raises(TrainingError) as err:
        check_config(bad)
    assert str(err.value) == ("3 setting problem(s):\n"
                              "  - --fold 2: --num_folds 2 numbers the folds 0 to 1\n"
                              "  - --val_fraction 0.2 with --fold: the fold's scans are the validation set; drop "
                              "--val_fraction\n"
                              f"  - --splits {tmp_path / 'none.json'}: no such file")
    check_config(dataclasses.replace(bad, fold=0, val_fraction=0.0), resuming=True)  # the study keeps the split
    for changes, message in (({"fold": 5}, "--fold 5: --num_folds 5 numbers the folds 0 to 4"),
                             ({"fold": -1}, "--fold -1: folds are numbered from 0"),
                             ({"fold": 0, "num_folds": 1}, "--num_folds must be >= 2, got 1"),
                             ({"num_folds": 3}, "--num_folds 3 without --fold: pass --fold K"),
                             ({"splits": "s.json"}, "--splits s.json without --fold: pass --fold K")):
        with pytest.raises(TrainingError, match=re.escape(message)):
            check_config(dataclasses.replace(base, **changes))


def test_a_format_1_run_keeps_the_settings_it_ran_with_and_a_format_2_run_its_own():
    old = saved_config(format_1({"epochs": 3, "data_dirs": {"CT": "ct"}}))
    assert (old.warp_prob, old.norm_stats, old.positive_centres, old.channels_last) == (0.5, "shared", "voxel", False)
    # A run saved with one folder per modality as a string reads it as a list of one folder.
    assert old.epochs == 3 and old.data_dirs["CT"][0].endswith("/ct") and old.data_dirs["CT"][0].startswith("/")
    new = saved_config({"format_version": 2, "config": {"train": dataclasses.asdict(TrainConfig(epochs=3))}})
    assert new == TrainConfig(epochs=3)


@pytest.mark.parametrize("changes, message", [
    ({"spacing": (-6.0, 6.0, 6.0)}, "--spacing -6 6 6: give three voxel sizes in mm, each a positive finite number"),
    ({"spacing": (float("inf"), 6.0, 6.0)}, "--spacing inf 6 6: give three voxel sizes in mm"),
    ({"spacing": (0.0, 0.0, 0.0)}, "--spacing 0 0 0: give three voxel sizes in mm"),
    ({"spacing": (float("nan"), 1.0, 1.0)}, "--spacing nan 1 1: give three voxel sizes in mm"),
    ({"ct_window": (275.0, -125.0)}, "--ct_window 275 -125: give the low end, then a higher high end"),
    ({"ct_window": (100.0, 100.0)}, "--ct_window 100 100: give the low end, then a higher high end"),
    ({"mr_percentiles": (99.0, 1.0)}, "--mr_percentiles 99 1: give two percentiles with 0 <= low < high <= 100"),
    ({"mr_percentiles": (0.0, 150.0)}, "--mr_percentiles 0 150: give two percentiles with 0 <= low < high <= 100"),
])
def test_preprocessing_that_would_destroy_the_data_is_refused(changes, message):
    # Each of these trained to exit 0 on all-background labels or all-zero images, or failed after preprocessing.
    with pytest.raises(TrainingError) as err:
        check_config(TrainConfig(data_dirs={"CT": "x", "MR": "y"}, **changes))
    assert str(err.value).startswith("1 setting problem(s)") and message in str(err.value)


def test_an_out_that_is_a_file_is_a_problem_with_the_folders_given(tmp_path):
    # As in infer.py and evaluate: exit code 3, checked once the settings can work.
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(DataError, match=f"--out {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file"):
        check_config(TrainConfig(data_dirs={"CT": "x"}, out=str(tmp_path / "taken" / "run")))
    with pytest.raises(TrainingError, match="--epochs must be > 0"):
        check_config(TrainConfig(data_dirs={"CT": "x"}, out=str(tmp_path / "taken" / "run"), epochs=0))


def test_defaults_have_one_source():
    import inspect

    from mulmodseg.data.preprocess import CT_WINDOW, MR_PERCENTILES, ROI_SIZE, SPACING, default_settings
    from mulmodseg.data.sampling import CropDataset

    cfg = TrainConfig()
    assert (cfg.spacing, cfg.ct_window, cfg.mr_percentiles, cfg.roi_size) == (SPACING, CT_WINDOW, MR_PERCENTILES,
                                                                              ROI_SIZE)
    assert default_settings("CT")["window"] == [-125.0, 275.0]
    assert default_settings("MR")["percentiles"] == [0.5, 99.5]
    assert default_settings("MR")["spacing"] == [1.5, 1.5, 2.0] and default_settings("MR")["min_size"] == [96] * 3
    crops = inspect.signature(CropDataset).parameters
    assert crops["positive_centres"].default == cfg.positive_centres == "class"
    assert tuple(crops["roi_size"].default) == cfg.roi_size == (96, 96, 96)


def test_the_field_of_view_and_remap_flags_reach_the_crops_with_any_augmentation():
    from mulmodseg.cli import train as train_cli
    from mulmodseg.config import crop_settings
    for augment in ("paper", "nnunet", "none"):
        args = train_cli.build_parser().parse_args(["--ct_dir", "x", "--augment", augment, "--fov_prob", "0.3",
                                                    "--fov_min", "0.15", "--remap_prob", "0.4"])
        settings = crop_settings(train_cli.config_from_args(args), "CT")
        assert (settings["fov_prob"], settings["fov_min"], settings["remap_prob"]) == (0.3, 0.15, 0.4)
    assert (TrainConfig().fov_prob, TrainConfig.from_dict({}).fov_prob) == (0.0, 0.0)  # off, as the paper
    assert (TrainConfig().remap_prob, TrainConfig.from_dict({}).remap_prob) == (0.0, 0.0)
