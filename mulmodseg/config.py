"""A training run's settings: ``TrainConfig``, and every check that can be made of them before any data is read.

``check_config`` lists every setting that cannot work at once (``TrainingError``), including the fold flags
(``fold_config_problems``); a resumed run takes its saved settings (``saved_config``) with the resumable ones
the user gave applied (``resumed_config``). Paths are made absolute (``absolute_paths``), so that a saved run
resumes from any folder. ``preprocess_settings`` turns the config into ``mulmodseg.data.preprocess``'s
settings, ``crop_settings`` into ``mulmodseg.data.CropDataset``'s, ``augment_settings`` into ``mulmodseg.augment``'s,
``build_table`` into the embedding table of ``--text``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mulmodseg import data as mdata
from mulmodseg import text as mtext
from mulmodseg.augment import NnUNetAugment
from mulmodseg.data.preprocess import CT_WINDOW, MR_PERCENTILES, ROI_SIZE, SPACING, settings_problems
from mulmodseg.errors import UserError
from mulmodseg.files import folder_problem
from mulmodseg.model import NORM_STATS
from mulmodseg.nets import BACKBONES
from mulmodseg.text import EmbeddingTable
from mulmodseg.text.prompts import resolve_classes

BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
# --augment: the paper's (intensity shift and scale per crop, and the optional --rotate_degrees / --scale_range
# warp), nnU-Net v2's default set (mulmodseg.augment, batched on the training device), or none.
AUGMENTATIONS = ("paper", "nnunet", "none")
DEFAULT_FOLDS = 5  # nnU-Net's


class TrainingError(UserError):
    """A run that cannot start or cannot go on, with what to do about it in the message."""


@dataclass
class TrainConfig:
    """Every setting of a run; saved as JSON in the run directory and inside each checkpoint."""

    data_dirs: dict[str, list[str]] = field(default_factory=dict)  # modality name -> its dataset folders
    labelled: dict[str, list[str]] = field(default_factory=dict)  # dataset folder -> the classes it labels
    out: str = "runs/mulmodseg"
    backbone: str = "unet"
    feature_size: int = 48  # SwinUNETR only
    base_channels: int = 32  # UNet only: width of the first conv (the reference's 32)
    text: str = "clip"  # clip | onehot | none | path of a saved table
    clip_weights: str | None = None
    clip_activation: str | None = None  # the text tower's MLP activation when its weights do not say it
    template: str = "v3"
    classes: str = "amos"
    mode: str = "alt"  # alt | mix | a modality name
    modality_order: list[str] | None = None  # ALT order; default: the order of data_dirs
    roi_size: tuple[int, int, int] = ROI_SIZE
    batch_size: int = 1  # volumes per step; each gives num_samples crops
    num_samples: int = 2
    augment: str = "paper"  # paper | nnunet | none (AUGMENTATIONS)
    augment_options: dict[str, Any] = field(default_factory=dict)  # nnunet: augment.NnUNetAugment settings changed
    rotate_degrees: float = 0.0  # random rotation about the S/I axis, up to this many degrees (reference CT: 6)
    scale_range: float = 0.0  # random per-axis scaling by 1 +- this (reference CT: 0.1)
    warp_modalities: list[str] | None = None  # modalities that get rotation/scaling (None: all; reference: CT)
    warp_prob: float = 1.0  # share of crops that get them (the reference's RandAffine: prob 1.0)
    fov_prob: float = 0.0  # share of crops cut to a random box around their centre (a slab's or a crop's view)
    fov_min: float = 0.2  # the box's least length per axis, as a share of the crop's
    remap_prob: float = 0.0  # share of crops whose intensities go through a random curve (shape over brightness)
    mirror_axes: tuple[int, ...] = ()  # RAS axes mirrored with p 0.5, labels unchanged (nnU-Net); none: reference
    epochs: int = 1000
    warmup_epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | none
    compile: bool = False
    grad_clip: float = 0.0
    max_skipped_steps: int = 10  # consecutive steps skipped for a corrupt gradient (alt.GradientGuard) that stop a run
    gradient_checkpointing: bool = False
    channels_last: bool | None = None  # channels_last_3d layout; None: auto (the UNet on the CPU, use_channels_last)
    norm_stats: str = "per_modality"  # UNet BatchNorm running statistics: per_modality | shared (bench/learn.py)
    positive_centres: str = "class"  # crop centres: "class" (a present class, then a voxel) | "voxel" (reference)
    num_workers: int = 2
    spacing: tuple[float, float, float] = SPACING
    ct_window: tuple[float, float] = CT_WINDOW
    mr_percentiles: tuple[float, float] = MR_PERCENTILES
    label_map: str | None = None
    max_cases: dict[str, int] = field(default_factory=dict)  # modality -> cases kept (CT:MR ratios)
    val_fraction: float = 0.0
    fold: int | None = None  # cross-validation: train fold K into OUT/fold_K, validating on its scans
    num_folds: int | None = None  # with fold: DEFAULT_FOLDS, or the folds of splits / OUT/splits.json
    splits: str | None = None  # with fold: a user's splits file (mulmodseg.data.make_folds' shape)
    val_every: int = 0
    sw_batch_size: int = 4
    save_every: int = 1
    keep_every: int = 0
    cache_dir: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        # One folder may be given as a string (the Python API, checkpoints of format 1 and 2).
        self.data_dirs = {name: [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
                          for name, dirs in self.data_dirs.items()}

    @property
    def modalities(self) -> list[str]:
        """The run's modalities in ALT order: ``modality_order``, else the order of ``data_dirs``."""
        return list(self.modality_order or self.data_dirs)

    @property
    def trained_modalities(self) -> list[str]:
        """The modalities trained on: all of them (``alt``, ``mix``), or the one ``mode`` names."""
        return self.modalities if self.mode in ("alt", "mix") else [self.mode]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from JSON (lists back to tuples where the field is a tuple); a field ``values`` lacks gets
        its default."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{name: tuple(value) if isinstance(value, list) and "tuple" in str(fields[name].type) else value
                      for name, value in values.items() if name in fields})


# Checkpoint format 1 took new settings in as they came: a file of it without one was written before the setting
# existed, and its run did what these values do (the warp shared the intensity augmentation's probability, the
# UNet pooled its BatchNorm statistics over modalities, crop centres were uniform over labelled voxels, the layout
# was contiguous). Format 2 files hold every setting; a new one with a default that changes what a run does needs
# format 3 and the old behaviour here.
FORMAT_1_DEFAULTS = {"warp_prob": 0.5, "norm_stats": "shared", "positive_centres": "voxel", "channels_last": False}


def saved_config(checkpoint: dict) -> TrainConfig:
    """The settings a checkpoint's run trained with, its paths absolute from the current folder (a run started
    from the Python API, or saved in format 1, holds them as they were given)."""
    values = checkpoint["config"]["train"]
    if checkpoint["format_version"] == 1:
        values = {**FORMAT_1_DEFAULTS, **values}
    return absolute_paths(TrainConfig.from_dict(values))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its folders and files as absolute paths from the current folder, so that a saved run
    resumes from anywhere and ``data/ct``, ``./data/ct/`` and ``/home/me/data/ct`` compare equal. A
    ``text``, ``classes`` or ``label_map`` that names no file (``clip``, ``amos``, ``205:1,...``) stays."""
    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    changes: dict[str, Any] = {"data_dirs": {name: [absolute(d) for d in dirs] for name, dirs in cfg.data_dirs.items()},
                               "labelled": {absolute(d): names for d, names in cfg.labelled.items()}}
    for name in ("cache_dir", "clip_weights", "splits"):
        if getattr(cfg, name):
            changes[name] = absolute(getattr(cfg, name))
    for name in ("text", "classes", "label_map"):
        value = getattr(cfg, name)
        if isinstance(value, str) and value and os.path.isfile(os.path.expanduser(value)):
            changes[name] = absolute(value)
    return dataclasses.replace(cfg, **changes)


# Settings a resumed run may change: none of them alters what the run has learned so far.
RESUMABLE = frozenset({"epochs", "device", "out", "num_workers", "log_every", "save_every", "keep_every",
                       "val_every", "sw_batch_size", "cache_dir", "max_skipped_steps"})


def run_dir(out: str | Path, fold: int | None) -> Path:
    """The folder of a run's checkpoints and logs: ``out``, or ``out/fold_K`` for fold K of a
    cross-validation study (beside the study's ``out/splits.json``)."""
    return Path(out) if fold is None else Path(out) / f"fold_{fold}"


# train.py's flags for the preprocessing settings (mulmodseg.data.preprocess.settings_problems).
PREPROCESS_FLAGS = {"spacing": "--spacing", "window": "--ct_window", "percentiles": "--mr_percentiles"}


def check_config(cfg: TrainConfig, resuming: bool = False) -> list[str]:
    """Raise one ``TrainingError`` listing every setting that cannot work (preprocessing that would destroy the
    data too), before any data is read, then a ``DataError`` for an ``--out`` or ``--cache_dir`` that cannot be
    written; returns warnings of settings that work but are unlikely to be meant.
    ``resuming``: the table file of ``--text`` and the ``--splits`` file need not exist (the table comes
    back with the weights, the split is ``OUT/splits.json``)."""
    problems = []
    if not cfg.data_dirs:
        problems.append("no dataset given: pass --ct_dir and/or --mr_dir")
    if sorted(cfg.modalities) != sorted(cfg.data_dirs):
        problems.append(f"--modality_order {cfg.modalities} must name each of {list(cfg.data_dirs)} once")
    if cfg.mode not in ("alt", "mix") and cfg.mode not in cfg.modalities:
        problems.append(f"--mode {cfg.mode!r}: choose alt, mix or one of {cfg.modalities}")
    for name in ("epochs", "batch_size", "num_samples", "save_every", "log_every", "sw_batch_size", "lr",
                 "max_skipped_steps"):
        if not getattr(cfg, name) > 0:
            problems.append(f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("warmup_epochs", "keep_every", "val_every", "num_workers", "weight_decay", "grad_clip",
                 "rotate_degrees", "scale_range", "seed"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.backbone == "unet" and not cfg.base_channels >= 1:
        problems.append(f"--base_channels must be >= 1, got {cfg.base_channels}")
    if cfg.backbone == "swinunetr" and (cfg.feature_size < 12 or cfg.feature_size % 12):
        problems.append(f"--feature_size must be a positive multiple of 12 (the paper's 48), got {cfg.feature_size}")
    if not resuming and cfg.text not in ("clip", "onehot", "none") and not Path(cfg.text).expanduser().is_file():
        problems.append(f"--text {cfg.text}: neither clip, onehot nor none, and no such table file")
    try:
        resolve_classes(cfg.classes)
    except (ValueError, OSError) as e:
        problems.append(f"--classes {cfg.classes}: {e}")
    if cfg.label_map:
        try:
            mdata.parse_label_map(cfg.label_map)
        except (ValueError, OSError) as e:
            problems.append(f"--label_map {cfg.label_map}: {e}")
    problems += settings_problems({"spacing": cfg.spacing, "window": cfg.ct_window,
                                   "percentiles": cfg.mr_percentiles}, PREPROCESS_FLAGS)
    if any(a not in (0, 1, 2) for a in cfg.mirror_axes) or len(set(cfg.mirror_axes)) != len(cfg.mirror_axes):
        problems.append(f"--mirror_axes {' '.join(map(str, cfg.mirror_axes))}: give distinct RAS axes among 0 1 2")
    if cfg.norm_stats not in NORM_STATS:
        problems.append(f"--norm_stats {cfg.norm_stats!r}: choose one of {list(NORM_STATS)}")
    if cfg.positive_centres not in mdata.POSITIVE_CENTRES:
        problems.append(f"--positive_centres {cfg.positive_centres!r}: choose one of {list(mdata.POSITIVE_CENTRES)}")
    if cfg.channels_last not in (None, True, False):
        problems.append(f"--channels_last {cfg.channels_last!r}: choose auto, on or off (None, True or False)")
    problems += augment_problems(cfg)
    if not 0 <= cfg.warp_prob <= 1:
        problems.append(f"--warp_prob must be in [0, 1], got {cfg.warp_prob}")
    if not 0 <= cfg.fov_prob <= 1:
        problems.append(f"--fov_prob must be in [0, 1], got {cfg.fov_prob}")
    if not 0 < cfg.fov_min <= 1:
        problems.append(f"--fov_min must be in (0, 1], got {cfg.fov_min}")
    if not 0 <= cfg.remap_prob <= 1:
        problems.append(f"--remap_prob must be in [0, 1], got {cfg.remap_prob}")
    if not 0 <= cfg.val_fraction < 1:
        problems.append(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
    problems += fold_config_problems(cfg, resuming)
    if (cfg.val_every and not cfg.val_fraction and cfg.fold is None
            and not any(mdata.has_validation_list(d) for dirs in cfg.data_dirs.values() for d in dirs)):
        problems.append(f"--val_every {cfg.val_every} has nothing to validate on: also pass --val_fraction, e.g. 0.2, "
                        "or --fold, or give a dataset.json with a validation list")
    if cfg.backbone not in BACKBONES:
        problems.append(f"--backbone {cfg.backbone!r}: choose one of {sorted(BACKBONES)}")
    else:
        divisor = BACKBONES[cfg.backbone].size_divisor
        if any(r <= 0 or r % divisor for r in cfg.roi_size):
            fit = [max(divisor, round(r / divisor) * divisor) for r in cfg.roi_size]
            problems.append(f"--roi_size {' '.join(map(str, cfg.roi_size))}: --backbone {cfg.backbone} needs multiples "
                            f"of {divisor}, e.g. {' '.join(map(str, fit))}")
    for name in cfg.warp_modalities or []:
        if name not in cfg.data_dirs:
            problems.append(f"--warp_modalities {name}: no modality {name!r} in this run ({list(cfg.data_dirs)})")
    folders = {d for dirs in cfg.data_dirs.values() for d in dirs}
    for folder, names in cfg.labelled.items():
        if folder not in folders:
            problems.append(f"--labelled {folder}: not one of the run's dataset folders ({', '.join(sorted(folders))})")
        elif not names:
            problems.append(f"--labelled {folder}: name the classes it labels, e.g. {folder}=liver,spleen")
    for name, count in cfg.max_cases.items():
        if name not in cfg.data_dirs:
            problems.append(f"--max_cases {name}={count}: no modality {name!r} in this run ({list(cfg.data_dirs)})")
        elif count < 1:
            problems.append(f"--max_cases {name}={count} must keep at least 1 case")
    if problems:
        raise TrainingError(f"{len(problems)} setting problem(s):\n  - " + "\n  - ".join(problems))
    # Folders are files given, as in infer.py and evaluate (exit code 3), checked once the settings can work. A
    # shared --cache_dir that others fill may be read-only: missing entries are reported when written.
    unwritable = [problem
                  for flag, folder, writable in (("--out", cfg.out, True), ("--cache_dir", cfg.cache_dir, False))
                  if folder and (problem := folder_problem(folder, flag, writable))]
    if unwritable:
        raise mdata.DataError(unwritable)
    if cfg.backbone == "swinunetr" and max(cfg.roi_size) < 2 * BACKBONES["swinunetr"].size_divisor:
        return [f"--roi_size {' '.join(map(str, cfg.roi_size))} with SwinUNETR: the 1/32 level is a single voxel, "
                "which instance norm sets to 0, so encoder10 learns nothing; use 64 along some axis"]
    return []


def crop_settings(cfg: TrainConfig, modality: str) -> dict[str, Any]:
    """``mulmodseg.data.CropDataset``'s settings for one modality: with ``--augment paper`` its intensity
    augmentation, mirroring and (for ``--warp_modalities``) warp; none of them otherwise (``--augment nnunet``
    augments on the device, ``augment_settings``). The limited field of view (``--fov_prob``) and the intensity
    remapping (``--remap_prob``) apply with any."""
    paper = cfg.augment == "paper"
    warped = paper and (cfg.warp_modalities is None or modality in cfg.warp_modalities)
    return {"num_samples": cfg.num_samples, "aug_prob": 0.5 if paper else 0.0,
            "rotate_degrees": cfg.rotate_degrees if warped else 0.0, "scale_range": cfg.scale_range if warped else 0.0,
            "warp_prob": cfg.warp_prob, "positive_centres": cfg.positive_centres,
            "flip": cfg.mirror_axes if paper else (), "seed": cfg.seed, "fov_prob": cfg.fov_prob,
            "fov_min": cfg.fov_min, "remap_prob": cfg.remap_prob}


def augment_settings(cfg: TrainConfig) -> NnUNetAugment:
    """``--augment nnunet``'s settings: nnU-Net's defaults with ``augment_options`` applied, mirroring the axes of
    ``--mirror_axes`` (the one mirroring flag, which infer.py's ``--tta`` follows too)."""
    return NnUNetAugment(mirror_axes=cfg.mirror_axes).with_overrides(cfg.augment_options)


def augment_problems(cfg: TrainConfig) -> list[str]:
    """``check_config``'s part for ``--augment``, ``--augment_set`` and the paper augmentation's warp flags."""
    if cfg.augment not in AUGMENTATIONS:
        return [f"--augment {cfg.augment!r}: choose one of {list(AUGMENTATIONS)}"]
    if cfg.augment != "nnunet":
        return [f"--augment_set applies to --augment nnunet, not {cfg.augment}"] if cfg.augment_options else []
    problems = [f"--{name} {getattr(cfg, name)} is the paper augmentation's warp; with --augment nnunet set "
                f"rotation and scaling with --augment_set (e.g. rotation_degrees=15,scale_range=0.85:1.25)"
                for name in ("rotate_degrees", "scale_range") if getattr(cfg, name)]
    if "mirror_axes" in cfg.augment_options:
        problems.append("--augment_set mirror_axes: mirroring follows --mirror_axes (and infer.py --tta with it)")
    else:
        try:
            augment_settings(cfg)
        except ValueError as error:
            problems.append(f"--augment_set: {error}")
    return problems


def fold_config_problems(cfg: TrainConfig, resuming: bool = False) -> list[str]:
    """``check_config``'s part for ``--fold``, ``--num_folds`` and ``--splits``: the last two only with
    ``--fold``, a fold number that exists, and no ``--val_fraction`` (the fold is the validation set)."""
    if cfg.fold is None:
        return [f"{flag} {value} without --fold: pass --fold K to train fold K (0-based) of a cross-validation"
                for flag, value in (("--num_folds", cfg.num_folds), ("--splits", cfg.splits)) if value is not None]
    problems = []
    folds = cfg.num_folds or (None if cfg.splits else DEFAULT_FOLDS)
    if cfg.num_folds is not None and cfg.num_folds < 2:
        problems.append(f"--num_folds must be >= 2, got {cfg.num_folds}")
    elif cfg.fold < 0:
        problems.append(f"--fold {cfg.fold}: folds are numbered from 0")
    elif folds is not None and cfg.fold >= folds:  # with --splits alone, the file's count is checked in prepare
        problems.append(f"--fold {cfg.fold}: --num_folds {folds} numbers the folds 0 to {folds - 1}")
    if cfg.val_fraction:
        problems.append(f"--val_fraction {cfg.val_fraction} with --fold: the fold's scans are the validation set; "
                        "drop --val_fraction")
    if cfg.splits and not resuming and not Path(cfg.splits).expanduser().is_file():
        problems.append(f"--splits {cfg.splits}: no such file")
    return problems


def resumed_config(saved: TrainConfig, given: TrainConfig, fields: Iterable[str]) -> TrainConfig:
    """The saved run's settings with the ``fields`` of ``given`` applied (``out`` always); raises
    ``TrainingError`` naming each given setting that differs and would change what was trained."""
    changed = {name for name in fields if getattr(given, name) != getattr(saved, name)} | {"out"}
    frozen = sorted(changed - RESUMABLE)
    if frozen:
        detail = "; ".join(f"{n}: saved {getattr(saved, n)!r}, given {getattr(given, n)!r}" for n in frozen)
        raise TrainingError(f"--resume continues {given.out} with its saved settings, and these cannot change "
                            f"mid-run: {detail}. Drop them, or start a new run in another --out")
    return dataclasses.replace(saved, **{name: getattr(given, name) for name in changed})


def preprocess_settings(config: TrainConfig, modality: str) -> dict[str, Any]:
    """``mulmodseg.data.preprocess`` settings for one modality from the run's config."""
    settings = mdata.default_settings(modality)
    settings["spacing"] = list(config.spacing)
    if modality == "CT":
        settings["window"] = list(config.ct_window)
    elif "percentiles" in settings:
        settings["percentiles"] = list(config.mr_percentiles)
    if config.label_map:
        settings["label_map"] = {str(k): v for k, v in mdata.parse_label_map(config.label_map).items()}
    settings["min_size"] = list(config.roi_size)
    return settings


def build_table(config: TrainConfig, modalities: list[str], classes: list[str], cache_dir: Path
                ) -> EmbeddingTable | None:
    """The embedding table for ``--text``: None (vision-only), one-hot, CLIP prompts (``text.cached_clip_table``), or a
    saved file; the text package's problems with weights and tables are raised as ``TrainingError``."""
    if config.text == "none":
        return None
    if config.text == "onehot":
        return EmbeddingTable.onehot(tuple(modalities), tuple(classes))
    try:
        if config.text == "clip":
            return mtext.cached_clip_table(config.clip_weights, classes, modalities, config.template,
                                           config.clip_activation, cache_dir)
        table = EmbeddingTable.load(config.text, classes=classes)
    except mtext.WeightsUnavailableError as error:
        raise TrainingError(f"{error}; or train with --text onehot or --text none, which need no CLIP weights"
                            ) from error
    except (mtext.WeightsError, mtext.TableError) as error:
        raise TrainingError(str(error)) from error
    missing = sorted(set(modalities) - set(table.modalities))
    if missing:
        raise TrainingError(f"{config.text}: the table has no rows for {missing} (it has {list(table.modalities)})")
    return table
