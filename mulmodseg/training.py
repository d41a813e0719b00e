"""The trainer: alternating (ALT) training over one loader per modality, and everything around it.

ALT (the method's training scheme): every iteration takes one batch of each modality in a fixed
order (CT, MR, ... for N modalities) and for each runs forward with that modality, the Dice + CE
loss, backward and an optimizer step. An epoch is ``max(len(loader))`` iterations; shorter loaders
cycle. ``mode="mix"`` draws mixed batches from one shuffled loader instead, and a modality name as
mode trains on that modality alone (the paper's single-modality baselines).

Around the loop: a warm-up + cosine schedule stepped per epoch, AMP, gradient clipping, validation
with the sliding-window inferer, atomic checkpoints with exact resume (model, optimizer, scheduler,
scaler, counters, RNG states; the crops are a pure function of seed, epoch and index), a JSON-lines
log, loss curves as PNG, and DDP under ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mulmodseg import data as mdata
from mulmodseg import text as mtext
from mulmodseg.checkpoint import folder_problem, load_checkpoint, save_checkpoint
from mulmodseg.device import autocast_dtype, channels_last_inputs, resolve_device, use_channels_last
from mulmodseg.inferer import sliding_window_inference
from mulmodseg.losses import DiceCELoss
from mulmodseg.metrics import dice_per_class, summarise, write_reports
from mulmodseg.model import NORM_STATS, MulModSeg
from mulmodseg.nets import BACKBONES
from mulmodseg.text import EmbeddingTable
from mulmodseg.text.prompts import model_table, resolve_classes
from mulmodseg.viz import plot_curves

BUNDLED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
DEFAULT_FOLDS = 5  # nnU-Net's
SPLITS_FILE = "splits.json"  # in --out: the folds every fold of a cross-validation study shares


class TrainingError(Exception):
    """A run that cannot start or cannot go on, with what to do about it in the message."""


@dataclass
class TrainConfig:
    """Every setting of a run; saved as JSON in the run directory and inside each checkpoint."""

    data_dirs: dict[str, str] = field(default_factory=dict)  # modality name -> dataset folder
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
    roi_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 1  # volumes per step; each gives num_samples crops
    num_samples: int = 2
    rotate_degrees: float = 0.0  # random rotation about the S/I axis, up to this many degrees (reference CT: 6)
    scale_range: float = 0.0  # random per-axis scaling by 1 +- this (reference CT: 0.1)
    warp_modalities: list[str] | None = None  # modalities that get rotation/scaling (None: all; reference: CT)
    warp_prob: float = 1.0  # share of crops that get them (the reference's RandAffine: prob 1.0)
    mirror_axes: tuple[int, ...] = ()  # RAS axes mirrored with p 0.5 (left/right swaps paired classes); none: reference
    epochs: int = 1000
    warmup_epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | none
    compile: bool = False
    grad_clip: float = 0.0
    gradient_checkpointing: bool = False
    channels_last: bool | None = None  # channels_last_3d layout; None: auto (the UNet on the CPU, use_channels_last)
    norm_stats: str = "per_modality"  # UNet BatchNorm running statistics: per_modality | shared (bench/learn.py)
    positive_centres: str = "class"  # crop centres: "class" (a present class, then a voxel) | "voxel" (reference)
    num_workers: int = 2
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    ct_window: tuple[float, float] = (-125.0, 275.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Rebuild from JSON (lists back to tuples where the field is a tuple). A field that a file of an
        older version lacks gets the value that version used (``OLDER_DEFAULTS``); any other its default."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {name: value for name, value in OLDER_DEFAULTS.items() if name not in values}
        for name, value in values.items():
            if name in fields:
                kwargs[name] = tuple(value) if isinstance(value, list) and "tuple" in str(fields[name].type) else value
        return cls(**kwargs)


# What runs saved before a field existed did: the warp shared the intensity augmentation's probability,
# the UNet pooled its BatchNorm statistics over modalities, crop centres were uniform over labelled voxels,
# and the layout was contiguous.
OLDER_DEFAULTS = {"warp_prob": 0.5, "norm_stats": "shared", "positive_centres": "voxel", "channels_last": False}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its folders and files as absolute paths from the current folder, so that a saved run
    resumes from anywhere and ``data/ct``, ``./data/ct/`` and ``/home/me/data/ct`` compare equal. A
    ``text``, ``classes`` or ``label_map`` that names no file (``clip``, ``amos``, ``205:1,...``) stays."""
    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    changes: dict[str, Any] = {"data_dirs": {name: absolute(d) for name, d in cfg.data_dirs.items()}}
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
                       "val_every", "sw_batch_size", "cache_dir"})


def run_dir(out: str | Path, fold: int | None) -> Path:
    """The folder of a run's checkpoints and logs: ``out``, or ``out/fold_K`` for fold K of a
    cross-validation study (beside the study's ``out/splits.json``)."""
    return Path(out) if fold is None else Path(out) / f"fold_{fold}"


def check_config(cfg: TrainConfig, resuming: bool = False) -> None:
    """Raise one ``TrainingError`` listing every setting that cannot work, before any data is read.
    ``resuming``: the table file of ``--text`` and the ``--splits`` file need not exist (the table comes
    back with the weights, the split is ``OUT/splits.json``)."""
    problems = []
    for name in ("epochs", "batch_size", "num_samples", "save_every", "log_every", "sw_batch_size", "lr"):
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
    # A shared --cache_dir that others fill may be read-only: missing entries are reported when written.
    for flag, folder, writable in (("--out", cfg.out, True), ("--cache_dir", cfg.cache_dir, False)):
        problem = folder and folder_problem(folder, flag, writable)
        if problem:
            problems.append(problem)
    if any(a not in (0, 1, 2) for a in cfg.mirror_axes) or len(set(cfg.mirror_axes)) != len(cfg.mirror_axes):
        problems.append(f"--mirror_axes {' '.join(map(str, cfg.mirror_axes))}: give distinct RAS axes among 0 1 2")
    if cfg.norm_stats not in NORM_STATS:
        problems.append(f"--norm_stats {cfg.norm_stats!r}: choose one of {list(NORM_STATS)}")
    if cfg.positive_centres not in mdata.POSITIVE_CENTRES:
        problems.append(f"--positive_centres {cfg.positive_centres!r}: choose one of {list(mdata.POSITIVE_CENTRES)}")
    if cfg.channels_last not in (None, True, False):
        problems.append(f"--channels_last {cfg.channels_last!r}: choose auto, on or off (None, True or False)")
    if not 0 <= cfg.warp_prob <= 1:
        problems.append(f"--warp_prob must be in [0, 1], got {cfg.warp_prob}")
    if not 0 <= cfg.val_fraction < 1:
        problems.append(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}")
    problems += fold_config_problems(cfg, resuming)
    if (cfg.val_every and not cfg.val_fraction and cfg.fold is None
            and not any(mdata.has_validation_list(d) for d in cfg.data_dirs.values())):
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
    for name, count in cfg.max_cases.items():
        if name not in cfg.data_dirs:
            problems.append(f"--max_cases {name}={count}: no modality {name!r} in this run ({list(cfg.data_dirs)})")
        elif count < 1:
            problems.append(f"--max_cases {name}={count} must keep at least 1 case")
    if problems:
        raise TrainingError(f"{len(problems)} setting problem(s):\n  - " + "\n  - ".join(problems))


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


def run_leftovers(out: Path) -> list[str]:
    """The names of the epoch files in the run folder ``out`` (log.jsonl, best.pt, epoch_N.pt): left
    by a run that stopped before its first last.pt, they keep a new run from mixing with them."""
    names = sorted(p.name for p in (out / "log.jsonl", out / "best.pt") if p.is_file())
    return names + sorted(p.name for p in out.glob("epoch_*.pt"))


def read_log(path: str | Path) -> list[dict]:
    """The epoch records of a run's ``log.jsonl``, skipping a line torn by a kill mid-write (or one
    being written while a plot is drawn)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_log(path: Path, epoch: int) -> None:
    """Drop the records of ``log.jsonl`` after ``epoch`` (epochs run after the checkpoint a run resumes
    from are run again, and would otherwise be logged twice), and any torn line."""
    if not path.is_file():
        return
    kept = [record for record in read_log(path) if record["epoch"] <= epoch]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- schedule


def warmup_cosine(epoch: int, warmup_epochs: int, total_epochs: int) -> float:
    """LR factor for 0-based ``epoch``: linear warm-up reaching 1 in the last warm-up epoch, then cosine.

    The reference's scheduler (stepped before each epoch, warm-up denominator W - 1) reaches the base
    LR one epoch early and trains its last epoch at LR 0; here epoch ``W - 1`` is the first at the
    base LR, epoch ``W`` starts the cosine at 1, and the last epoch still has a positive LR.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


# ---------------------------------------------------------------------------------------------- batches


class EpochLoader:
    """Batches of one dataset whose order and crops depend only on (seed, epoch, pass, rank).

    ``batches(epoch, pass_no)`` shuffles with a generator seeded from those numbers, gives this
    rank its share (``order[rank::world]``, padded by wrapping so every rank has the same length),
    and tells the dataset which draw it is so its random crops are reproducible under resume.
    """

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int = 0, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.rank, self.world = num_workers, rank, world
        self.per_rank = math.ceil(len(dataset) / world)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def batches(self, epoch: int, pass_no: int = 0) -> Iterator[dict]:
        draw = epoch * 1000 + pass_no
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        order = (order * self.world)[: self.per_rank * self.world][self.rank :: self.world]
        self.dataset.set_epoch(draw)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            collate_fn=mdata.collate_crops,
        )
        yield from loader


class ConcatCrops(torch.utils.data.ConcatDataset):
    """Several modalities' crop datasets as one (``mode="mix"``), passing ``set_epoch`` on to each."""

    def set_epoch(self, draw: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(draw)


def cycling(loader: EpochLoader, epoch: int) -> Iterator[dict]:
    """The loader's batches for ``epoch``, starting a fresh pass whenever one runs out."""
    pass_no = 0
    while True:
        yield from loader.batches(epoch, pass_no)
        pass_no += 1


def alt_batches(loaders: dict[str, EpochLoader], order: Sequence[str], epoch: int) -> Iterator[tuple[str, dict]]:
    """ALT: ``max(len)`` iterations, each yielding one batch per modality in ``order``."""
    streams = {name: cycling(loaders[name], epoch) for name in order}
    for _ in range(max(len(loaders[name]) for name in order)):
        for name in order:
            yield name, next(streams[name])


def mixed_batches(loader: EpochLoader, epoch: int) -> Iterator[tuple[list[str], dict]]:
    """One pass over a loader whose batches mix modalities; the modality is per crop."""
    for batch in loader.batches(epoch):
        yield batch["modality"], batch


# ---------------------------------------------------------------------------------------------- steps


def train_step(
    model: nn.Module,
    loss_fn: DiceCELoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict,
    modality: str | list[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 0.0,
    channels_last: bool = False,
) -> tuple[float, float]:
    """One forward/backward/optimizer step on ``batch`` ({"image": (B, 1, *roi), "label": (B, 1, *roi)}).

    Minimises ``loss_fn.lambda_dice * dice + loss_fn.lambda_ce * ce`` and returns the unweighted (dice, ce)
    loss terms. Raises ``FloatingPointError`` before stepping if the loss is
    not finite, so the weights stay as they were; under ``torch.distributed`` every rank raises when
    any rank's loss is not finite. ``channels_last`` lays the image out as
    channels_last_3d, for a model already converted to that format.
    """
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = batch["label"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(image, modality)
    dice, ce = loss_fn.terms(logits.float(), label)
    loss = loss_fn.lambda_dice * dice + loss_fn.lambda_ce * ce
    finite = bool(torch.isfinite(loss))
    if dist.is_initialized():
        # Every rank learns whether all losses are finite: one that stopped alone would leave the others
        # waiting forever in backward's gradient all-reduce.
        everywhere = torch.tensor([float(finite)], device=loss.device)
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
        if finite and not everywhere.item():
            raise FloatingPointError("the loss of another rank is not finite (its log says which); all ranks stop")
    if not finite:
        rank = f" on rank {dist.get_rank()}" if dist.is_initialized() else ""
        raise FloatingPointError(f"loss is {loss.item()}{rank} (dice {dice.item()}, ce {ce.item()})")
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return dice.item(), ce.item()


@torch.no_grad()
def validate(
    model: nn.Module,
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    modality: str,
    num_classes: int,
    roi_size: Sequence[int],
    device: torch.device,
    sw_batch_size: int = 4,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Per-case, per-class Dice (cases, K-1) of the argmax in the preprocessed space (NaN: absent in both).
    ``channels_last`` lays the windows out as channels_last_3d, for a model already in that format."""
    model.eval()
    predictor = channels_last_inputs(model) if channels_last else model
    rows = []
    for image, label in volumes:
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a copy: cached volumes are read-only
        logits = sliding_window_inference(
            x, roi_size, predictor, sw_batch_size=sw_batch_size, sw_device=device, device="cpu",
            autocast_dtype=amp_dtype, modality=modality,
        )
        rows.append(dice_per_class(logits.argmax(1)[0].numpy(), np.asarray(label), num_classes))
    model.train()
    return np.array(rows)


# ---------------------------------------------------------------------------------------------- run setup


def build_table(config: TrainConfig, modalities: Sequence[str], classes: Sequence[str], cache_dir: Path):
    """The embedding table for ``--text``: None (vision-only), one-hot, CLIP prompts, or a saved file.

    CLIP tables are cached in ``cache_dir`` under a key of the weights file (path, size, mtime), the
    classes, modalities, template and activation, so later runs skip loading the 250 MB text tower.
    """
    if config.text == "none":
        return None
    if config.text == "onehot":
        return EmbeddingTable.onehot(tuple(modalities), tuple(classes))
    if config.text == "clip":
        weights = Path(config.clip_weights).expanduser().resolve() if config.clip_weights else None
        stat = weights.stat() if weights and weights.is_file() else None
        key = json.dumps([str(weights), stat and stat.st_size, stat and stat.st_mtime_ns, list(classes),
                          list(modalities), config.template, config.clip_activation])
        cached = cache_dir / f"text_table_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if weights is not None and stat is not None and cached.is_file():
            return EmbeddingTable.load(cached)
        try:
            encoder = mtext.load_text_encoder(weights, download=weights is None, activation=config.clip_activation)
        except mtext.WeightsUnavailableError as error:
            raise mtext.WeightsUnavailableError(
                f"{error}; or train with --text onehot or --text none, which need no CLIP weights") from error
        table = mtext.build_embedding_table(encoder, classes, modalities, config.template)
        if stat is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            table.save(cached)
        return table
    table = EmbeddingTable.load(config.text, classes=classes)
    missing = sorted(set(modalities) - set(table.modalities))
    if missing:
        raise TrainingError(f"{config.text}: the table has no rows for {missing} (it has {list(table.modalities)})")
    if len(table.classes) != len(classes):
        raise TrainingError(f"{config.text}: the table has {len(table.classes)} classes, --classes gives {len(classes)}")
    return table


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_seconds(seconds: float) -> str:
    """``3h07m``, ``4m05s`` or ``12s``."""
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ---------------------------------------------------------------------------------------------- the run


class Trainer:
    """A training run in ``config.out``: set up with ``prepare()``, then ``fit()``.

    Everything that can be wrong with the input (folders, files, labels, text weights, an occupied
    run directory) is checked in ``prepare()`` before any long work starts.
    """

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None,
                 given: Iterable[str] | None = None):
        """``given``: the fields of ``config`` the caller chose (None: all); on resume only these are
        applied to the saved run's settings (see ``resumed_config``)."""
        self.config = config
        self.given = set(given) if given is not None else {f.name for f in dataclasses.fields(TrainConfig)}
        self.out = run_dir(config.out, config.fold)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.is_main = self.rank == 0
        self.resume_state: dict | None = None

    # -- setup -------------------------------------------------------------------------------------

    def prepare(self, resume: bool = False) -> None:
        """Check inputs, build data, model, optimizer; load ``last.pt`` when resuming."""
        cfg = self.config
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        last = self.out / "last.pt"
        if resume and not last.is_file():
            study = " (a cross-validation study: pass its --fold K)" if (self.out / SPLITS_FILE).is_file() else ""
            raise TrainingError(f"--resume: {last} does not exist{study}; start a new run without --resume")
        if not resume and last.is_file():
            raise TrainingError(
                f"{self.out} already holds a checkpoint ({last}); pass --resume to continue it or choose another --out"
            )
        leftovers = run_leftovers(self.out)
        if not resume and leftovers:  # a run stopped before its first last.pt: a new one would mix with it
            raise TrainingError(f"{self.out} holds files of an earlier run ({', '.join(leftovers)}) but no last.pt "
                                "to resume from; choose another --out, or delete them to start over")
        if resume:
            self.resume_state = load_checkpoint(last)
            # Runs saved by older versions hold paths relative to the folder they were started in.
            saved = absolute_paths(TrainConfig.from_dict(self.resume_state["config"]["train"]))
            self.config = cfg = resumed_config(saved, cfg, self.given)
            done = self.resume_state["epoch"]
            if done >= cfg.epochs:  # before any data is read or config.json rewritten
                raise TrainingError(f"--resume: {last} has finished {done} of {cfg.epochs} epochs; "
                                    f"pass --epochs above {done} to train on")
        check_config(cfg, resuming=resume)
        if cfg.backbone == "swinunetr" and max(cfg.roi_size) < 2 * BACKBONES["swinunetr"].size_divisor:
            self.log(f"warning: --roi_size {' '.join(map(str, cfg.roi_size))} with SwinUNETR: the 1/32 level is a "
                     "single voxel, which instance norm sets to 0, so encoder10 learns nothing; use 64 along some axis")
        if not cfg.data_dirs:
            raise TrainingError("no dataset given: pass --ct_dir and/or --mr_dir")
        self.modalities = list(cfg.modality_order or cfg.data_dirs)
        if sorted(self.modalities) != sorted(cfg.data_dirs):
            raise TrainingError(f"--modality_order {self.modalities} must name each of {list(cfg.data_dirs)} once")
        if cfg.mode not in ("alt", "mix") and cfg.mode not in self.modalities:
            raise TrainingError(f"--mode {cfg.mode!r}: choose alt, mix or one of {self.modalities}")
        self.train_modalities = self.modalities if cfg.mode in ("alt", "mix") else [cfg.mode]
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        self.device = resolve_device(cfg.device, self.local_rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.channels_last = use_channels_last(cfg.channels_last, cfg.backbone, self.device)
        self.classes = list(resolve_classes(cfg.classes))

        self.select_cases()
        if resume:
            self.check_resumed_cases(self.resume_state)
        all_cases = [c for name in self.train_modalities for c in self.cases[name] + self.val_cases[name]]
        label_map = mdata.parse_label_map(cfg.label_map) if cfg.label_map else None
        for warning in mdata.check_cases(all_cases, label_map=label_map, num_classes=len(self.classes),
                                         modalities=self.modalities, require_labels=True):
            self.log(f"warning: {warning}")

        table = None if resume else build_table(cfg, self.modalities, self.classes, self.cache_dir)
        self.model = self.build_model(table)
        if self.world > 1 and self.rank != 0:
            dist.barrier()  # rank 0 fills the preprocessing cache first; the others then read it
        self.setup_data()
        if self.world > 1 and self.rank == 0:
            dist.barrier()
        self.setup_optimisation()
        self.start_epoch, self.iteration, self.best = 0, 0, -1.0
        if resume:
            self.load_state(self.resume_state)
            # The optimizer state holds the saved schedule's lr; with a new --epochs it is another one.
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * warmup_cosine(self.start_epoch, cfg.warmup_epochs, cfg.epochs)
            if self.is_main:
                trim_log(self.out / "log.jsonl", self.start_epoch)
            self.log(f"resuming {last} at epoch {self.start_epoch + 1}/{cfg.epochs}")

    def select_cases(self) -> None:
        """``cases`` and ``val_cases`` per training modality: the fold's lists with ``--fold``, else the
        datalist's ``validation`` list when there is one, else a ``--val_fraction`` draw (or none); then
        ``--max_cases`` of the training scans."""
        cfg = self.config
        # A study's split covers every modality given, so that e.g. a CT-only and an ALT run share it.
        found = {name: mdata.discover_cases(cfg.data_dirs[name], name)
                 for name in (cfg.data_dirs if cfg.fold is not None else self.train_modalities)}
        self.splits = self.study_splits(found) if cfg.fold is not None else None
        self.cases, self.val_cases = {}, {}
        for name in self.train_modalities:
            cases, listed = found[name], mdata.validation_cases(cfg.data_dirs[name], name)
            if self.splits is not None:
                by_id = {c.id: c for c in cases}
                train, val = ([by_id[i] for i in self.splits[name][cfg.fold][part]] for part in ("train", "val"))
                unused = len(cases) - len(train) - len(val)
                if listed or unused:
                    self.log(f"{name}: fold {cfg.fold} leaves {unused} scan(s) of the training list and the "
                             f"{len(listed)} of the datalist's validation list unused")
            elif listed:
                if cfg.val_fraction:
                    raise TrainingError(f"--val_fraction {cfg.val_fraction}: {cfg.data_dirs[name]}/dataset.json has a "
                                        f"validation list ({len(listed)} scans), which is the validation set; drop "
                                        "--val_fraction")
                held = {c.id for c in listed}
                train, val = [c for c in cases if c.id not in held], listed
            else:
                train, val = mdata.split_cases(cases, cfg.val_fraction, cfg.seed) if cfg.val_fraction else (cases, [])
            if not train:
                how = (f"--fold {cfg.fold}" if self.splits is not None else "the datalist's validation list" if listed
                       else f"--val_fraction {cfg.val_fraction}; lower --val_fraction")
                raise TrainingError(f"{name}: no scans left to train on: {len(cases)} in {cfg.data_dirs[name]}, "
                                    f"{len(val)} held out by {how}")
            if name in cfg.max_cases:  # N training scans, as --max_cases says, whatever validation holds
                train = mdata.subsample(train, cfg.max_cases[name], cfg.seed)
            self.cases[name], self.val_cases[name] = train, val
        if cfg.val_every and not any(self.val_cases.values()):
            counts = ", ".join(f"{len(self.cases[n])} {n}" for n in self.train_modalities)
            raise TrainingError(f"--val_every {cfg.val_every}: --val_fraction {cfg.val_fraction} holds out no scan "
                                f"of {counts}; raise --val_fraction or drop --val_every")

    def study_splits(self, found: dict[str, list[mdata.Case]]) -> mdata.Splits:
        """The cross-validation study's folds: ``OUT/splits.json`` when an earlier fold wrote it (a given
        ``--splits`` must equal it), else the ``--splits`` file, else ``make_folds`` of the scans with
        ``--seed``; checked against the scans ``found`` ({modality: cases}). ``fit`` writes them to
        ``OUT/splits.json`` when it does not exist yet."""
        cfg = self.config
        ids = {name: [c.id for c in cases] for name, cases in found.items()}
        study, given = Path(cfg.out) / SPLITS_FILE, Path(cfg.splits) if cfg.splits else None
        if given is not None and not given.is_file():  # a resumed run whose file is gone: the study keeps the split
            given = None
        if study.is_file():
            splits, where = read_splits(study), study
            if given is not None and read_splits(given) != splits:
                raise TrainingError(f"--splits {given} differs from {study}, the split of this study's other folds; "
                                    f"give the same file, or another --out")
        elif given is not None:
            splits, where = read_splits(given), given
        else:
            try:
                return mdata.make_folds(ids, cfg.num_folds or DEFAULT_FOLDS, cfg.seed)
            except ValueError as error:
                raise TrainingError(f"--num_folds {cfg.num_folds or DEFAULT_FOLDS}: {error}") from None
        problems = mdata.fold_problems(splits, ids, str(where))
        count = len(next(iter(splits.values()))) if not problems else 0
        if count and cfg.num_folds and count != cfg.num_folds:
            problems.append(f"{where} holds {count} folds, but --num_folds is {cfg.num_folds}")
        elif count and cfg.fold >= count:
            problems.append(f"--fold {cfg.fold}: {where} holds folds 0 to {count - 1}")
        if problems:
            raise TrainingError(f"{len(problems)} problem(s) with the split:\n  - " + "\n  - ".join(problems))
        return splits

    def build_model(self, table) -> MulModSeg:
        """A fresh network (same initial weights on every rank), or the resumed run's shape."""
        cfg = self.config
        seed_everything(cfg.seed)
        if self.resume_state is not None:  # the table comes back with the state dict
            model = MulModSeg.from_config(self.resume_state["config"]["model"])
        else:
            kwargs = ({"feature_size": cfg.feature_size} if cfg.backbone == "swinunetr"
                      else {"base_channels": cfg.base_channels})
            model = MulModSeg(cfg.backbone, len(self.classes), *model_table(table, self.modalities, self.classes),
                              norm_stats=cfg.norm_stats, **kwargs)
        model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last_3d) if self.channels_last else model

    def setup_data(self) -> None:
        cfg = self.config
        cache = mdata.VolumeCache(self.cache_dir)
        self.settings = {name: preprocess_settings(cfg, name) for name in self.modalities}
        self.loaders, self.val_volumes = {}, {}
        datasets = {}
        for m_index, name in enumerate(self.train_modalities):
            warped = cfg.warp_modalities is None or name in cfg.warp_modalities
            t0 = time.time()
            volumes = mdata.load_training_volumes(self.cases[name], self.settings[name], cache)
            self.val_volumes[name] = mdata.load_training_volumes(self.val_cases[name], self.settings[name], cache)
            self.log(f"{name}: {len(volumes)} training and {len(self.val_volumes[name])} validation volumes "
                     f"ready in {time.time() - t0:.1f}s")
            # Distinct crop streams per rank and per modality (primes keep the seeds apart).
            datasets[name] = mdata.CropDataset(
                volumes, cfg.roi_size, num_samples=cfg.num_samples, modality=name,
                rotate_degrees=cfg.rotate_degrees if warped else 0.0, scale_range=cfg.scale_range if warped else 0.0,
                warp_prob=cfg.warp_prob, positive_centres=cfg.positive_centres,
                flip=cfg.mirror_axes, flip_label_order=mdata.left_right_order(self.classes),
                seed=cfg.seed + 7919 * self.rank + 104729 * m_index,
            )

        def loader(dataset, seed: int) -> EpochLoader:
            return EpochLoader(dataset, cfg.batch_size, seed, cfg.num_workers, self.rank, self.world)

        if cfg.mode == "mix":
            self.mixed = loader(ConcatCrops(list(datasets.values())), cfg.seed)
        else:
            self.loaders = {name: loader(ds, cfg.seed + i) for i, (name, ds) in enumerate(datasets.items())}

    def setup_optimisation(self) -> None:
        cfg = self.config
        self.loss_fn = DiceCELoss()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: warmup_cosine(e, cfg.warmup_epochs, cfg.epochs)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.net = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            self.net = torch.compile(self.net)

    # -- state -------------------------------------------------------------------------------------

    def checkpoint_config(self) -> dict:
        return {
            "train": dataclasses.asdict(self.config),
            "model": self.model.config(),
            "preprocess": self.settings,
            "classes": list(self.classes),
            "modalities": list(self.modalities),
            "roi_size": list(self.config.roi_size),
        }

    def case_ids(self) -> dict[str, dict[str, list[str]]]:
        """{modality: {"train": ids, "val": ids}}: the scans this run trains and validates on."""
        return {name: {"train": [c.id for c in self.cases[name]], "val": [c.id for c in self.val_cases[name]]}
                for name in self.train_modalities}

    def check_resumed_cases(self, ckpt: dict) -> None:
        """Raise ``TrainingError`` when the scans found now are not the ones the saved run used (files
        added to or removed from its folders): resuming would train on another set without a word."""
        saved = ckpt.get("cases")
        if saved is None:  # written before the lists were saved
            if self.config.max_cases and self.config.val_fraction:
                raise TrainingError("--resume: this run was started by an older mulmodseg, which drew --max_cases "
                                    "before the --val_fraction split (now after it), so its scans cannot be "
                                    "found again; start a new run")
            return
        now = self.case_ids()
        for name in now:
            for part in ("train", "val"):
                added = sorted(set(now[name][part]) - set(saved[name][part]))
                missing = sorted(set(saved[name][part]) - set(now[name][part]))
                changes = [f"{len(ids)} {what}: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}"
                           for what, ids in (("new", added), ("gone", missing)) if ids]
                if changes:
                    raise TrainingError(
                        f"--resume: the {name} {'training' if part == 'train' else 'validation'} scans differ from the "
                        f"saved run's ({'; '.join(changes)}): were files added to or removed from "
                        f"{self.config.data_dirs[name]}? Restore them, or start a new run")

    def save(self, path: Path, epoch: int) -> None:
        save_checkpoint(
            path, self.checkpoint_config(), self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=epoch, iteration=self.iteration, best=self.best,
            rng=rng_state(), cases=self.case_ids(),
        )

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.iteration, self.best = ckpt["epoch"], ckpt["iteration"], ckpt["best"]
        set_rng_state(ckpt["rng"])

    # -- loop --------------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> tuple[int, Iterable]:
        """(number of optimizer steps, iterator of (modality, batch)) for one epoch."""
        cfg = self.config
        if cfg.mode == "mix":
            return len(self.mixed), mixed_batches(self.mixed, epoch)
        order = self.train_modalities
        return max(len(self.loaders[n]) for n in order) * len(order), alt_batches(self.loaders, order, epoch)

    def fit(self) -> dict:
        """Train from ``start_epoch`` to ``config.epochs``; returns the last epoch's log record."""
        cfg = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.checkpoint_config(), indent=2))
            study = Path(cfg.out) / SPLITS_FILE
            if self.splits is not None and not study.is_file():
                # Folds started at once make the same split: whichever renames last writes what the other wrote.
                tmp = study.with_name(f".{study.name}.{os.getpid()}")
                tmp.write_text(json.dumps(self.splits, indent=1) + "\n")
                tmp.replace(study)
        self.net.train()
        record: dict = {}
        t_start, steps_done = time.time(), 0
        for epoch in range(self.start_epoch, cfg.epochs):
            n_steps, batches = self.epoch_batches(epoch)
            sums: dict[str, list[float]] = {}
            lr = self.optimizer.param_groups[0]["lr"]
            for step, (modality, batch) in enumerate(batches, 1):
                try:
                    dice, ce = train_step(self.net, self.loss_fn, self.optimizer, self.scaler, batch, modality,
                                          self.device, self.amp_dtype, cfg.grad_clip, self.channels_last)
                except FloatingPointError as exc:
                    last = self.out / "last.pt"
                    kept = (f"The last good checkpoint is kept: {last}" if last.is_file()
                            else "No checkpoint had been written yet.")
                    raise TrainingError(
                        f"training stopped at epoch {epoch + 1}, step {step} ({modality}): {exc}. {kept}"
                    ) from exc
                self.iteration += 1
                steps_done += 1
                key = modality if isinstance(modality, str) else "mix"
                acc = sums.setdefault(key, [0.0, 0.0, 0])
                acc[0] += dice
                acc[1] += ce
                acc[2] += 1
                if self.is_main and (step % cfg.log_every == 0 or step == n_steps):
                    rate = steps_done / (time.time() - t_start)
                    left = (cfg.epochs - epoch - 1) * n_steps + (n_steps - step)
                    terms = " | ".join(f"{k} dice {a[0] / a[2]:.4f} ce {a[1] / a[2]:.4f}" for k, a in sums.items())
                    self.log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{n_steps} | {terms} | lr {lr:.2e} | "
                             f"{rate:.2f} steps/s | ETA {format_seconds(left / rate)}")
            self.scheduler.step()
            record = {"epoch": epoch + 1, "iteration": self.iteration, "lr": lr, "time": time.time() - t_start}
            for k, a in sums.items():
                record[f"{k}/dice_loss"], record[f"{k}/ce_loss"] = a[0] / a[2], a[1] / a[2]
            # A fold always validates after its last epoch: its reports are the cross-validation's result.
            last_of_fold = cfg.fold is not None and epoch + 1 == cfg.epochs
            if (cfg.val_every and (epoch + 1) % cfg.val_every == 0) or last_of_fold:
                record.update(self.run_validation(epoch + 1))
            self.end_epoch(epoch + 1, record)
            self.start_epoch = epoch + 1  # a later fit() with more epochs continues from here
        if self.is_main:
            self.write_curves()
        return record

    def run_validation(self, epoch: int) -> dict:
        """Validate every training modality's validation scans: the log record's scores, and (rank 0)
        ``mulmodseg.metrics.write_reports`` into ``validation/<modality>/`` of the run folder, replacing
        the previous epoch's."""
        scores = {}
        for name in self.train_modalities:
            if not self.val_volumes[name]:
                continue
            dice = validate(self.model, self.val_volumes[name], name, len(self.classes), self.config.roi_size,
                            self.device, self.config.sw_batch_size, self.amp_dtype, self.channels_last)
            rows = [{"case": case.id, "modality": name, "dice": row} for case, row in zip(self.val_cases[name], dice)]
            summary = summarise(rows)
            if self.is_main:
                folder = self.out / "validation" / name
                folder.mkdir(parents=True, exist_ok=True)
                fold = "" if self.config.fold is None else f"fold {self.config.fold} "
                write_reports(folder, rows, self.classes[1:], f"{fold}{name}",
                              {"epoch": epoch, "fold": self.config.fold, "modality": name, "classes": self.classes},
                              f"Dice of the argmax on the training grid (the preprocessed scans), epoch {epoch}.")
            scores[f"{name}/val_dice"] = summary["mean"]
            scores[f"{name}/val_dice_per_class"] = [None if np.isnan(v) else float(v) for v in summary["per_class"]]
            self.log(f"validation {name}: mean Dice {summary['mean']:.4f}")
        return scores

    def end_epoch(self, epoch: int, record: dict) -> None:
        cfg = self.config
        if not self.is_main:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        val = [v for k, v in record.items() if k.endswith("/val_dice")]
        if val and float(np.mean(val)) > self.best:
            self.best = float(np.mean(val))
            self.save(self.out / "best.pt", epoch)
        if epoch % cfg.save_every == 0 or epoch == cfg.epochs:
            self.save(self.out / "last.pt", epoch)
        if cfg.keep_every and epoch % cfg.keep_every == 0:
            self.save(self.out / f"epoch_{epoch}.pt", epoch)

    def write_curves(self) -> None:
        write_curves(self.out / "log.jsonl", self.out / "curves.png")


def read_splits(path: Path) -> object:
    """The JSON in a splits file (its shape is checked by ``mulmodseg.data.fold_problems``)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"--splits {path}: unreadable ({error})") from None


def write_curves(log_path: str | Path, png_path: str | Path) -> None:
    """Loss curves per modality and validation Dice from a run's ``log.jsonl``, as a PNG."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in read_log(log_path):
        for key, value in record.items():
            if key.endswith(("_loss", "/val_dice")):
                series.setdefault(key, []).append((record["epoch"], value))
    if series:
        plot_curves(series, png_path)


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] | None = None,
          given: Iterable[str] | None = None) -> dict:
    """Run a whole training (under ``torchrun`` too); returns the last epoch's log record.

    ``resume``: continue ``config.out`` from its ``last.pt``, with the saved settings plus the fields
    ``given`` of ``config`` (None: all of them), of which only ``RESUMABLE`` ones may differ.
    """
    try:
        trainer = Trainer(config, log, given)
        trainer.prepare(resume)
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
