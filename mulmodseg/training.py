"""The trainer: a run folder around the alternating training of ``mulmodseg.alt``.

``Trainer.prepare`` checks everything that can be wrong before any long work (settings, the run folder, the
scans, the text weights), then builds: the run's settings (``mulmodseg.config``), its scans
(``mulmodseg.selection``), the embedding table and the model, one crop loader per modality, the optimiser.
``Trainer.fit`` runs the epochs: ALT (or mixed) steps, validation with the sliding-window inferer, and the
run folder's files: atomic checkpoints with exact resume (model, optimizer, scheduler, scaler, counters, RNG
states; the crops are a pure function of seed, epoch, modality, pass and item), ``config.json``, a JSON-lines
log and the loss curves as PNG. Under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mulmodseg import data as mdata
from mulmodseg.alt import (
    ConcatCrops,
    EpochLoader,
    GradientGuard,
    alt_epoch,
    mixed_batches,
    train_step,
    warmup_cosine,
)
from mulmodseg.augment import augment_batch, input_size
from mulmodseg.checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from mulmodseg.config import (
    TrainConfig,
    TrainingError,
    augment_settings,
    build_table,
    check_config,
    crop_settings,
    preprocess_settings,
    resumed_config,
    run_dir,
    saved_config,
)
from mulmodseg.device import autocast_dtype, channels_last_inputs, resolve_device, use_channels_last
from mulmodseg.errors import DiskFullError
from mulmodseg.files import FolderLock, atomic_write, lock_folder, remove_dead_temporaries
from mulmodseg.losses import DiceCELoss
from mulmodseg.metrics import mask_unlabelled, summarise
from mulmodseg.model import MulModSeg
from mulmodseg.progress import format_seconds
from mulmodseg.runlog import append_record, how_to_go_on, run_leftovers, trim_log, write_curves
from mulmodseg.selection import (
    SPLITS_FILE,
    case_ids,
    check_resumed_cases,
    check_resumed_datasets,
    dataset_records,
    select_cases,
)
from mulmodseg.text import EmbeddingTable
from mulmodseg.text.prompts import model_table, resolve_classes
from mulmodseg.validation import validate, write_validation


class Trainer:
    """A training run in ``config.out`` (``out/fold_K`` for a fold): ``prepare()``, then ``fit()``."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None,
                 given: Iterable[str] | None = None):
        """``given``: the fields of ``config`` the caller chose (None: all); on resume only these are
        applied to the saved run's settings (``config.resumed_config``)."""
        self.config = config
        self.given = set(given) if given is not None else {f.name for f in dataclasses.fields(TrainConfig)}
        self.out = run_dir(config.out, config.fold)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.is_main = self.rank == 0
        self.resume_state: dict | None = None
        self.lock: FolderLock | None = None
        self.saved_epoch: int | None = None  # the epoch of the run folder's last.pt, once known

    # -- setup -------------------------------------------------------------------------------------

    def prepare(self, resume: bool = False) -> None:
        """Open the run folder and settle the settings, select and check the scans, build the table and
        model, the crop loaders and the optimiser; when resuming, load ``last.pt``'s state. A run that cannot
        start lets its folder go (``close``); one that can holds it until ``close``, which ``train`` calls."""
        try:
            self.open_run(resume)
            self.select_scans()
            self.hold_run_folder()
            table = None if resume else build_table(self.config, self.modalities, self.classes, self.cache_dir)
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
        except BaseException:
            self.close()
            raise

    def open_run(self, resume: bool) -> None:
        """Join the process group under torchrun; refuse a run folder that another live run writes (its lock,
        ``files.lock_folder``, taken here when the folder exists), or that holds another run (or, to resume,
        none); take a resumed run's saved settings with the given ones applied; check every setting."""
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and self.config.device != "cpu" else "gloo")
        if self.is_main:
            self.lock = lock_folder(self.out, "training run", create=False)
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
            self.config = resumed_config(saved_config(self.resume_state), self.config, self.given)
            done = self.saved_epoch = self.resume_state["epoch"]
            if done >= self.config.epochs:  # before any data is read or config.json rewritten
                raise TrainingError(f"--resume: {last} has finished {done} of {self.config.epochs} epochs; "
                                    f"pass --epochs above {done} to train on")
        cfg = self.config
        for warning in check_config(cfg, resuming=resume):
            self.log(f"warning: {warning}")
        self.modalities, self.train_modalities = cfg.modalities, cfg.trained_modalities
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        self.device = resolve_device(cfg.device, self.local_rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device, training=True)
        self.channels_last = use_channels_last(cfg.channels_last, cfg.backbone, self.device)
        self.classes = list(resolve_classes(cfg.classes))

    def hold_run_folder(self) -> None:
        """Rank 0, once the settings and scans passed their checks: hold the run folder's lock (creating the
        folder), then remove the temporaries that writes killed midway left there."""
        if not self.is_main:
            return
        self.lock = self.lock or lock_folder(self.out, "training run")
        removed = remove_dead_temporaries(self.out)
        if removed:
            self.log(removed)

    def select_scans(self) -> None:
        """``cases`` and ``val_cases`` per trained modality (``selection.select_cases``), the ones the saved
        run used when resuming; every file checked before any is preprocessed."""
        cfg = self.config
        self.cases, self.val_cases, self.splits = select_cases(cfg, self.log)
        self.datasets = dataset_records(cfg)
        if self.resume_state is not None:
            check_resumed_cases(self.resume_state.get("cases"), case_ids(self.cases, self.val_cases), cfg)
            check_resumed_datasets(self.resume_state["config"].get("datasets"), self.datasets)
        every = [c for name in self.train_modalities for c in self.cases[name] + self.val_cases[name]]
        label_map = mdata.parse_label_map(cfg.label_map) if cfg.label_map else None
        # With the run's preprocessing: a scan it would collapse, flatten or empty of a class is refused here.
        self.settings = {name: preprocess_settings(cfg, name) for name in self.modalities}
        settings = {name: [value] for name, value in self.settings.items()}
        for warning in mdata.check_cases(every, label_map=label_map, num_classes=len(self.classes),
                                         modalities=self.modalities, require_labels=True, class_names=self.classes,
                                         settings=settings):
            self.log(f"warning: {warning}")

    def build_model(self, table: EmbeddingTable | None) -> MulModSeg:
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
        """The preprocessed volumes (through the cache) and one crop loader per trained modality, or one mixed."""
        cfg = self.config
        cache = mdata.VolumeCache(self.cache_dir)
        self.val_volumes, datasets = {}, {}
        # Masks of the labelled classes go with every crop once one dataset is partial: a mixed batch's rows then
        # all carry one, and a batch of fully labelled rows still takes the full-label loss.
        partial = any(c.labelled is not None for n in self.train_modalities for c in self.cases[n])
        # --augment nnunet: the loader cuts larger crops, augment.augment_batch turns them into training crops on
        # the device (augmented_batch); paper: CropDataset augments each crop; none: neither does.
        self.augment = augment_settings(cfg) if cfg.augment == "nnunet" else None
        cut = cfg.roi_size if self.augment is None else input_size(cfg.roi_size, self.augment)
        for name in self.train_modalities:
            t0 = time.time()
            volumes = mdata.load_training_volumes(self.cases[name], self.settings[name], cache)
            self.val_volumes[name] = mdata.load_training_volumes(self.val_cases[name], self.settings[name], cache)
            self.log(f"{name}: {len(volumes)} training and {len(self.val_volumes[name])} validation volumes "
                     f"ready in {time.time() - t0:.1f}s")
            masks = [mdata.labelled_mask(c.labelled, len(self.classes)) for c in self.cases[name]] if partial else None
            datasets[name] = mdata.CropDataset(volumes, cfg.roi_size, modality=name, labelled=masks, cut_size=cut,
                                               keys=self.augment is not None, **crop_settings(cfg, name))

        def loader(dataset, modality: int) -> EpochLoader:
            return EpochLoader(dataset, cfg.batch_size, cfg.seed, modality, mdata.collate_crops, cfg.num_workers,
                               self.rank, self.world)

        # A modality's index in the run keys its shuffle and crops; the mixed loader's shuffle has a key of its own.
        if cfg.mode == "mix":
            self.loaders, self.mixed = {}, loader(ConcatCrops(list(datasets.values())), len(self.modalities))
        else:
            self.loaders = {name: loader(ds, self.modalities.index(name)) for name, ds in datasets.items()}

    def augmented_batch(self, batch: dict) -> dict:
        """``batch`` with its image and label on the device and, with ``--augment nnunet``, augmented there
        (``augment.augment_batch``, each crop drawn from its key) to ``roi_size``."""
        if self.augment is None:
            return batch
        image, label = augment_batch(batch["image"].to(self.device, non_blocking=True),
                                     batch["label"].to(self.device, non_blocking=True), batch["key"].tolist(),
                                     self.augment, self.config.roi_size)
        return {**batch, "image": image, "label": label}

    def setup_optimisation(self) -> None:
        """Loss, AdamW, the warm-up + cosine schedule, the fp16 grad scaler, DDP and torch.compile wrappers."""
        cfg = self.config
        self.loss_fn = DiceCELoss()
        self.guard = GradientGuard()
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
        """What inference needs of the run: its settings, the model's shape, preprocessing, names."""
        return {
            "train": dataclasses.asdict(self.config),
            "model": self.model.config(),
            # min_size, the padding to one window, is the run's roi_size: stored once, in "train".
            "preprocess": {name: {k: v for k, v in s.items() if k != "min_size"} for name, s in self.settings.items()},
            "classes": list(self.classes),
            "modalities": list(self.modalities),
            "datasets": self.datasets,
        }

    def save(self, path: Path, epoch: int) -> None:
        """A checkpoint after ``epoch`` epochs, with everything an exact resume needs."""
        save_checkpoint(
            path, self.checkpoint_config(), self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=epoch, iteration=self.iteration, best=self.best,
            rng=rng_state(), cases=case_ids(self.cases, self.val_cases),
        )
        if path == self.out / "last.pt":
            self.saved_epoch = epoch

    def close(self) -> None:
        """Let another run write the run folder."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def load_state(self, ckpt: dict) -> None:
        """Continue from ``ckpt``: weights, optimiser, schedule (re-fitted to ``--epochs``), counters, RNGs."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.iteration, self.best = ckpt["epoch"], ckpt["iteration"], ckpt["best"]
        set_rng_state(ckpt["rng"])
        # The optimizer state holds the saved schedule's lr; with a new --epochs it is another one.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * warmup_cosine(self.start_epoch, self.config.warmup_epochs, self.config.epochs)
        if self.is_main:
            trim_log(self.out / "log.jsonl", self.start_epoch)
        self.log(f"resuming {self.out / 'last.pt'} at epoch {self.start_epoch + 1}/{self.config.epochs}")

    # -- loop --------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train from ``start_epoch`` to ``config.epochs``; returns the last epoch's log record."""
        cfg = self.config
        if self.is_main:
            self.write_run_files()
        self.net.train()
        record: dict = {}
        self.t_start, self.steps_done = time.time(), 0  # the rate and ETA of the progress lines
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self.train_epoch(epoch)
            # A fold always validates after its last epoch: its reports are the cross-validation's result.
            last_of_fold = cfg.fold is not None and epoch + 1 == cfg.epochs
            if (cfg.val_every and (epoch + 1) % cfg.val_every == 0) or last_of_fold:
                record.update(self.run_validation(epoch + 1))
            self.end_epoch(epoch + 1, record)
            self.start_epoch = epoch + 1  # a later fit() with more epochs continues from here
        if self.is_main:
            write_curves(self.out / "log.jsonl", self.out / "curves.png")
        return record

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of ALT (``alt.alt_epoch``) or mixed steps, then the schedule's step; its log record: the lr,
        the time and each modality's mean Dice and CE loss terms and skipped steps. A loss that is not finite, or
        ``max_skipped_steps`` corrupt gradients in a row, stop the run (``TrainingError``)."""
        cfg, order = self.config, self.train_modalities
        n_steps = len(self.mixed) if cfg.mode == "mix" else max(len(self.loaders[n]) for n in order) * len(order)
        sums: dict[str, list[float]] = {}
        lr = self.optimizer.param_groups[0]["lr"]
        step, skipped = 0, self.guard.skipped

        def stopped(modality: str, why: str) -> TrainingError:
            return TrainingError(f"training stopped at epoch {epoch + 1}, step {step} ({modality}): {why}")

        def after_step(modality: str | list[str], dice: float, ce: float) -> None:
            nonlocal step, skipped
            step, self.iteration, self.steps_done = step + 1, self.iteration + 1, self.steps_done + 1
            name = modality if isinstance(modality, str) else "mix"
            if self.guard.consecutive >= cfg.max_skipped_steps:
                raise stopped(name, f"the last {self.guard.consecutive} steps' gradients were not finite or above "
                              f"{self.guard.max_norm:g}, so none was applied. {self.kept_checkpoint()} Try --amp none "
                              "(bf16 on a CPU without AMX has given such gradients), a lower --lr, or --grad_clip 1")
            acc = sums.setdefault(name, [0.0, 0.0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + dice, acc[1] + ce, acc[2] + 1
            acc[3], skipped = acc[3] + self.guard.skipped - skipped, self.guard.skipped
            if self.is_main and (step % cfg.log_every == 0 or step == n_steps):
                rate = self.steps_done / (time.time() - self.t_start)
                left = (cfg.epochs - epoch - 1) * n_steps + (n_steps - step)
                terms = " | ".join(f"{k} dice_loss {a[0] / a[2]:.4f} ce_loss {a[1] / a[2]:.4f}"
                                   + (f" skipped {a[3]}" if a[3] else "") for k, a in sums.items())
                self.log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{n_steps} | {terms} | lr {lr:.2e} | "
                         f"{rate:.2f} steps/s | ETA {format_seconds(left / rate)}")

        options = dict(loss_fn=self.loss_fn, optimizer=self.optimizer, scaler=self.scaler, device=self.device,
                       amp_dtype=self.amp_dtype, grad_clip=cfg.grad_clip, channels_last=self.channels_last,
                       guard=self.guard)
        try:
            if cfg.mode == "mix":
                for modality, batch in mixed_batches(self.mixed, epoch):
                    after_step(modality, *train_step(self.net, self.augmented_batch(batch), modality, **options))
            else:
                alt_epoch(self.net, self.loaders, order, epoch, prepare=self.augmented_batch, after_step=after_step,
                          **options)
        except FloatingPointError as exc:
            step += 1  # the step that failed: ALT's steps take the modalities in turn
            raise stopped("mix" if cfg.mode == "mix" else order[(step - 1) % len(order)],
                          f"{exc}. {self.kept_checkpoint()}") from exc
        self.scheduler.step()
        record = {"epoch": epoch + 1, "iteration": self.iteration, "lr": lr, "time": time.time() - self.t_start}
        for k, a in sums.items():
            record[f"{k}/dice_loss"], record[f"{k}/ce_loss"] = a[0] / a[2], a[1] / a[2]
            record[f"{k}/skipped_steps"] = a[3]
        return record

    def kept_checkpoint(self) -> str:
        """What a stopped run leaves to go on from, for its message."""
        last = self.out / "last.pt"
        return f"The last good checkpoint is kept: {last}" if last.is_file() else "No checkpoint had been written yet."

    def run_validation(self, epoch: int) -> dict:
        """Validate every trained modality's validation scans: the log record's scores, and (rank 0)
        ``mulmodseg.metrics.write_reports`` into ``validation/<modality>/`` of the run folder, replacing
        the previous epoch's."""
        cfg, scores = self.config, {}
        predictor = channels_last_inputs(self.model) if self.channels_last else self.model
        for name in self.train_modalities:
            if not self.val_volumes[name]:
                continue
            dice = validate(self.model, self.val_volumes[name], name, len(self.classes), cfg.roi_size, self.device,
                            predictor=predictor, sw_batch_size=cfg.sw_batch_size, amp_dtype=self.amp_dtype)
            rows = [{"case": case.id, "modality": name, **mask_unlabelled({"dice": row}, case.labelled)}
                    for case, row in zip(self.val_cases[name], dice)]
            summary = summarise(rows)
            if self.is_main:
                write_validation(self.out / "validation" / name, rows, self.classes, name, epoch, cfg.fold)
            scores[f"{name}/val_dice"] = summary["mean"]
            scores[f"{name}/val_dice_per_class"] = [None if np.isnan(v) else float(v) for v in summary["per_class"]]
            self.log(f"validation {name}: mean Dice {summary['mean']:.4f}")
        return scores

    def end_epoch(self, epoch: int, record: dict) -> None:
        """Rank 0: the epoch's log line, and the checkpoints due (best.pt, last.pt, epoch_N.pt)."""
        cfg = self.config
        if not self.is_main:
            return
        append_record(self.out / "log.jsonl", record)
        val = [v for k, v in record.items() if k.endswith("/val_dice")]
        if val and float(np.mean(val)) > self.best:
            self.best = float(np.mean(val))
            self.save(self.out / "best.pt", epoch)
        if epoch % cfg.save_every == 0 or epoch == cfg.epochs:
            self.save(self.out / "last.pt", epoch)
        if cfg.keep_every and epoch % cfg.keep_every == 0:
            self.save(self.out / f"epoch_{epoch}.pt", epoch)

    def write_run_files(self) -> None:
        """``config.json`` in the run folder, and a new study's ``splits.json`` beside the fold folders."""
        settings = json.dumps(self.checkpoint_config(), indent=2)
        atomic_write(self.out / "config.json", lambda tmp: tmp.write_text(settings))
        study = Path(self.config.out) / SPLITS_FILE
        if self.splits is not None and not study.is_file():
            # Folds started at once make the same split: whichever renames last writes what the other wrote.
            atomic_write(study, lambda tmp: tmp.write_text(json.dumps(self.splits, indent=1) + "\n"))


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] | None = None,
          given: Iterable[str] | None = None) -> dict:
    """Run a whole training (under ``torchrun`` too); returns the last epoch's log record.

    ``resume``: continue ``config.out`` from its ``last.pt``, with the saved settings plus the fields
    ``given`` of ``config`` (None: all of them), of which only ``config.RESUMABLE`` ones may differ.
    """
    trainer = Trainer(config, log, given)
    try:
        trainer.prepare(resume)
        return trainer.fit()
    except DiskFullError as error:
        raise DiskFullError(f"{error}; free space there; {how_to_go_on(trainer.out, trainer.saved_epoch)}",
                            error.errno) from error
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
