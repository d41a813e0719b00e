"""Inference on NIfTI files: checkpoint in, label maps on the input's own grid out, Dice if labels are given.

Each scan is preprocessed exactly as in training (settings from the checkpoint), segmented with the
sliding-window inferer, its softmax restored linearly onto the original voxel grid and argmaxed there
(``mulmodseg.data.restore_argmax``); the result is written with the input's affine, qform and sform, as
unsigned integers holding the training class ids, or the dataset's own label values when the run
used a label map. Several checkpoints (e.g. the folds of a cross-validation) segment as one
``Ensemble``, the mean of their softmax probabilities; a folder can be shared by several processes,
each segmenting its share (``outputs.input_share``).

``segment_files`` plans a call first (``outputs.plan_outputs``: inputs, label files, output names, overwrite
rules, every problem at once), then segments each case (``segment_case``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch

from mulmodseg import data as mdata
from mulmodseg.checkpoint import load_checkpoint
from mulmodseg.cost import count_flops, count_parameters
from mulmodseg.data.checks import existing_output_problems
from mulmodseg.device import (
    accumulation_device,
    autocast_dtype,
    channels_last_inputs,
    resolve_device,
    use_channels_last,
)
from mulmodseg.files import atomic_write, lock_folder, remove_dead_temporaries
from mulmodseg.inferer import Progress, sliding_window_inference
from mulmodseg.metrics import case_metrics, write_reports
from mulmodseg.model import MulModSeg
from mulmodseg.outputs import (
    DATASET_JSON,
    OutputOptions,
    Plan,
    class_file,
    class_statistics,
    dataset_description,
    input_share,
    invert_label_map,
    plan_outputs,
    to_dataset_values,
    write_like,
    write_preview,
    written_values,
)
from mulmodseg.postprocess import keep_largest_ids, postprocess
from mulmodseg.progress import quarter_reporter
from mulmodseg.surface import check_nsd_tolerance


@dataclasses.dataclass
class InferenceSettings:
    """How to run the network over a scan."""

    sw_batch_size: int = 4
    overlap: float = 0.5
    mode: str = "gaussian"
    tta: bool = False  # average over the mirrors along the axes the checkpoint was trained with
    device: str = "auto"
    amp: str = "auto"  # auto | bf16 | fp16 | none
    channels_last: bool | None = None  # channels_last_3d network and windows; None: auto (use_channels_last)
    prompt_modality: str | None = None  # the paper's wrong-modality test: prompts of another modality

    def __post_init__(self) -> None:
        # Checked here, so that a bad flag fails before the checkpoint loads and any scan is read.
        if not isinstance(self.sw_batch_size, int) or self.sw_batch_size < 1:
            raise ValueError(f"--sw_batch_size {self.sw_batch_size}: must be a whole number of windows, at least 1")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"--overlap {self.overlap}: must be in [0, 1)")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"--mode {self.mode}: must be gaussian or constant")


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[MulModSeg, dict]:
    """The trained network (eval mode, on ``device``) and the checkpoint's config, each modality's preprocessing
    settings whole: with ``min_size``, the run's ``roi_size`` (a scan is padded to at least one window)."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    for settings in config["preprocess"].values():
        settings.setdefault("min_size", list(config["train"]["roi_size"]))
    model = MulModSeg.from_config(config["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


class InferenceInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``segment_files``' cases: ``complete`` lists the label maps whose cases have all their
    outputs (what ``skip_existing`` keeps), ``remaining`` the scans still to segment."""

    def __init__(self, complete: list[Path], remaining: list[Path]):
        super().__init__()
        self.complete, self.remaining = complete, remaining


class Segmenter:
    """A loaded checkpoint that segments scans of the modalities it was trained on."""

    def __init__(self, checkpoint: str | Path, settings: InferenceSettings | None = None):
        self.settings = settings or InferenceSettings()
        self.device = resolve_device(self.settings.device)
        self.amp_dtype = autocast_dtype(self.settings.amp, self.device)
        self.model, self.config = load_model(checkpoint, self.device)
        backbone = self.config["model"]["backbone"]
        self.channels_last = use_channels_last(self.settings.channels_last, backbone, self.device)
        self.predictor = self.model
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
            self.predictor = channels_last_inputs(self.model)
        self.roi_size = tuple(self.config["train"]["roi_size"])
        self.classes = self.config["classes"]
        self.modalities = list(self.config["preprocess"])
        # Test-time mirroring averages only the mirrors the model learned to be invariant to.
        self.mirror_axes = tuple(self.config["train"].get("mirror_axes", ()))
        if self.settings.tta and not self.mirror_axes:
            raise ValueError(f"--tta: {checkpoint} was trained without mirroring (train.py --mirror_axes), so a "
                             "mirrored scan is anatomy it never saw and its predictions would not agree with the "
                             "plain one; leave out --tta, or train with e.g. --mirror_axes 0 1 2")

    def check_modality(self, modality: str) -> None:
        """Raise a clear error for a modality this checkpoint has no preprocessing or prompts for."""
        if modality not in self.config["preprocess"]:
            raise ValueError(f"--modality {modality}: this checkpoint was trained on {self.modalities}")
        prompt = self.settings.prompt_modality
        if prompt is None:
            return
        if self.model.vision_only:
            raise ValueError(f"--prompt_modality {prompt}: this checkpoint is vision-only and has no prompts; "
                             "leave the flag out")
        if prompt not in self.model.modalities:
            raise ValueError(f"--prompt_modality {prompt}: the checkpoint's table has {list(self.model.modalities)}")

    @torch.no_grad()
    def logits(self, image: np.ndarray, modality: str, progress=False) -> torch.Tensor:
        """image: (X, Y, Z) preprocessed -> logits (K, X, Y, Z), on the GPU when they fit there
        (``accumulation_device``), else on the CPU."""
        s = self.settings
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
        free = 0
        if self.device.type == "cuda":
            # Memory PyTorch's allocator has cached but not handed out is free for the logits too.
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            free = torch.cuda.mem_get_info(self.device)[0] + cached
        out = sliding_window_inference(
            x, self.roi_size, self.predictor, sw_batch_size=s.sw_batch_size, overlap=s.overlap, mode=s.mode,
            sw_device=self.device, device=accumulation_device(self.device, len(self.classes), image.shape, free),
            progress=progress, tta_flips=self.mirror_axes if s.tta else (),
            autocast_dtype=self.amp_dtype, modality=modality, prompt_modality=s.prompt_modality,
        )
        return out[0]

    def segment(
        self, image_path: str | Path, modality: str, probabilities: bool = False, progress=False
    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """A scan on disk -> (label map of training ids on the original grid, softmax (K, X, Y, Z) in the
        training space when ``probabilities`` else None, preprocessing meta).

        The softmax is restored to the original grid linearly and the argmax taken there
        (``data.restore_argmax``), so the label map is the argmax of the probabilities that
        ``--save_probabilities`` restores the same way."""
        self.check_modality(modality)
        image, _, meta = mdata.preprocess(image_path, None, modality, **self.config["preprocess"][modality])
        probs = self.softmax(image, modality, progress)
        return mdata.restore_argmax(probs, meta), probs if probabilities else None, meta

    def softmax(self, image: np.ndarray, modality: str, progress=False) -> np.ndarray:
        """image: (X, Y, Z) preprocessed -> softmax (K, X, Y, Z) float32 on the CPU."""
        return softmax_(self.logits(image, modality, progress)).cpu().numpy()


class Ensemble:
    """Checkpoints that segment the same classes of the same modalities, averaged: the mean of their
    softmax probabilities, on the training grid when all of them preprocess the scan alike, else each
    group of alike ones restored linearly to the scan's grid first. One checkpoint is an ensemble of one,
    whose label maps are those of ``Segmenter.segment``."""

    def __init__(self, checkpoints: Sequence[str | Path], settings: InferenceSettings | None = None):
        """Load every checkpoint; raise ValueError, before any scan is read, when they are not one
        segmentation task (other classes, modalities or label maps)."""
        if not checkpoints:
            raise ValueError("--checkpoint: give at least one checkpoint")
        self.paths = [Path(c) for c in checkpoints]
        self.members = [Segmenter(path, settings) for path in self.paths]
        first = self.members[0]
        self.settings, self.device = first.settings, first.device
        self.classes, self.config = first.classes, first.config  # the written values: the same for every member
        # The written values depend on each modality's label map too: members must agree on them.
        task = [(m.classes, {k: v.get("label_map") for k, v in sorted(m.config["preprocess"].items())})
                for m in self.members]
        differ = [path for path, t in zip(self.paths, task) if t != task[0]]
        if differ:
            raise ValueError(
                f"--checkpoint: an ensemble's checkpoints must segment the same classes of the same modalities "
                f"(and label maps); {self.paths[0]} has {len(first.classes)} classes {first.classes} for "
                f"{first.modalities}, but "
                + "; ".join(f"{m_path} has {len(m.classes)} classes {m.classes} for {m.modalities}"
                            for m_path, m in zip(self.paths, self.members) if m_path in differ))

    def check_modality(self, modality: str) -> None:
        """``Segmenter.check_modality`` for every member."""
        for member in self.members:
            member.check_modality(modality)

    def segment(self, image_path: str | Path, modality: str, probabilities: bool = False, progress=False
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """A scan on disk -> (label map (X, Y, Z) of training ids on the scan's grid, the ensemble's softmax
        (K, X, Y, Z) on that grid as float16 when ``probabilities``, else None)."""
        self.check_modality(modality)
        groups: dict[str, list[Segmenter]] = {}  # members that preprocess the scan alike share one pass
        for member in self.members:
            groups.setdefault(json.dumps(member.config["preprocess"][modality], sort_keys=True), []).append(member)
        means = []
        for members in groups.values():
            image, _, meta = mdata.preprocess(image_path, None, modality, **members[0].config["preprocess"][modality])
            total = members[0].softmax(image, modality, progress)
            for member in members[1:]:
                total += member.softmax(image, modality, progress)
            total /= len(members)  # in place: a copy of a whole scan's softmax would raise the peak memory
            means.append((total, meta, len(members)))
        if len(means) == 1:
            mean, meta, _ = means[0]
            return mdata.restore_argmax(mean, meta), mdata.restore_probabilities(mean, meta) if probabilities else None
        restored = sum(mdata.restore_probabilities(mean, meta, np.float32) * count for mean, meta, count in means)
        restored /= len(self.members)
        return restored.argmax(0).astype(np.uint8), restored.astype(np.float16) if probabilities else None


def preprocessing(ensemble: Ensemble, modality: str) -> dict[str, list[dict]]:
    """``modality`` -> the preprocessing settings of the ensemble's members for it, as ``check_cases`` takes them."""
    return {modality: [member.config["preprocess"][modality] for member in ensemble.members]}


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0 of ``logits: (K, X, Y, Z)``, in place: a whole scan's logits are the largest
    array of inference, and a second copy of them would raise its peak memory by as much."""
    logits -= logits.max(0, keepdim=True).values
    logits.exp_()
    logits /= logits.sum(0, keepdim=True)
    return logits


def segment_files(
    checkpoint: str | Path | Sequence[str | Path],
    inputs: Sequence[Path],
    output_dir: str | Path,
    modality: str,
    settings: InferenceSettings | None = None,
    outputs: OutputOptions | None = None,
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    labels_dir: str | Path | None = None,
    labelled: Sequence[str] | None = None,
    nsd_tolerance: float = 2.0,
    num_parts: int = 1,
    part_id: int = 0,
    into_input_folder: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> list[dict]:
    """Segment ``inputs`` into ``output_dir`` with the ``Ensemble`` of ``checkpoint`` (one path or several);
    returns one record per case (with Dice, NSD at ``nsd_tolerance`` mm and HD95,
    ``mulmodseg.metrics.case_metrics``, when labels are given).

    Each label map is postprocessed on the scan's grid as ``outputs`` asks (``OutputOptions``: default, no
    postprocessing and nothing but the label maps), then written, and scored as written. Beside the label maps goes
    ``dataset.json`` (``outputs.dataset_description``); per case, the extra files ``outputs`` names.

    Before any inference: the checkpoint loads, the modality and the ``keep_largest`` classes are ones it
    knows, no other call writes ``output_dir`` (``files.lock_folder``; temporaries of killed writes there are
    removed), the outputs are planned (``outputs.plan_outputs``: names, label files, overwrite rules, not into
    the inputs' folder unless ``into_input_folder``) and every scan and label passes
    ``mulmodseg.data.check_cases`` (readable, 3D, finite, label values known, not destroyed by the checkpoint's
    preprocessing); all problems at once. ``skip_existing`` continues an interrupted call: a case whose outputs all
    exist is not segmented (nor postprocessed) again, its label map is read back for the evaluation, the others
    are segmented, and dataset.json and the evaluation tables are written anew; an existing label map that cannot
    be used (unreadable, another grid than its scan's, unknown values) is segmented again, with a warning.
    Ctrl-C while the cases run raises ``InferenceInterrupted``.

    ``num_parts`` > 1 segments only share ``part_id`` of ``inputs`` (``outputs.input_share``), so that that
    many processes fill one ``output_dir``: each writes the same dataset.json (an existing one is no conflict
    then), none scores (``labels_dir`` is refused: score the whole folder once every part is done). The parts
    share the folder's lock; a call with the same ``part_id`` or without ``num_parts`` is refused meanwhile.

    A class is scored only where the labels' dataset labels it: the class names ``labelled``, else the
    ``labels`` of the dataset.json in or above ``labels_dir`` (``mdata.labelled_classes``), else every class; the
    others are "not labelled" in the tables (a prediction of an unlabelled organ is no false positive).
    """
    output_dir, outputs = Path(output_dir), outputs or OutputOptions()
    input_share(inputs, num_parts, part_id)  # a part that does not exist is a bad flag: before the checkpoint loads
    check_nsd_tolerance(nsd_tolerance)
    if labels_dir is not None and num_parts > 1:
        raise ValueError(f"--labels with --num_parts {num_parts}: a part sees only its share of the scans; when every "
                         f"part is done, score the folder with python -m mulmodseg.evaluate --pred {output_dir} "
                         "--labels DIR, or run once more without --num_parts, with --skip_existing --labels DIR")
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    ensemble = Ensemble(checkpoints, settings)
    ensemble.check_modality(modality)
    classes = ensemble.classes
    inverse = invert_label_map(ensemble.config["preprocess"][modality])
    values = written_values(len(classes), inverse)
    largest = None if outputs.keep_largest is None else keep_largest_ids(outputs.keep_largest, classes, values)
    class_files = {k: class_file(classes[k]) for k in values} if outputs.per_class else {}
    probe = lock_folder(output_dir, "infer.py", create=False, shared=num_parts > 1)  # another call: say so at once
    if probe is not None:
        probe.release()
    plan = plan_outputs(inputs, output_dir, labels_dir, probabilities=outputs.probabilities, preview=outputs.preview,
                        statistics=outputs.statistics, class_files=class_files, overwrite=overwrite,
                        skip_existing=skip_existing, num_parts=num_parts, part_id=part_id,
                        into_input_folder=into_input_folder)
    label_map = ensemble.config["preprocess"][modality].get("label_map")
    scored = None if labels_dir is None else mdata.labelled_classes(
        classes, mdata.labels_file(labels_dir), labelled, label_map and mdata.parse_label_map(label_map))
    cases = [mdata.Case(plan.targets[src].name, src, plan.labels.get(src), modality, scored) for src in plan.inputs]
    warnings = plan.warnings + mdata.check_cases(cases, label_map=label_map, class_names=classes,
                                                 num_classes=None if label_map else len(classes),
                                                 settings=preprocessing(ensemble, modality))
    for src in sorted(plan.done):
        unusable = existing_output_problems(plan.targets[src], src, label_map, None if label_map else len(classes))
        if unusable:
            plan.done.discard(src)
            warnings.append(f"{unusable[0]}; segmented again")
    for warning in warnings:
        log(f"warning: {warning}")

    # Written before the first case: every label map in output_dir has its classes beside it.
    run_settings = {"modality": modality, "sliding_window": dataclasses.asdict(ensemble.settings),
                    "keep_largest": None if largest is None else [classes[k] for k in largest],
                    "min_component_mm3": outputs.min_component_mm3, "per_class": outputs.per_class,
                    "statistics": outputs.statistics, "save_probabilities": outputs.probabilities}
    description = dataset_description(classes, values, modality, checkpoints, run_settings)
    records, complete, locks = [], [], []
    try:
        locks.append(lock_folder(output_dir, "infer.py", shared=num_parts > 1))
        if num_parts > 1:  # the parts share the folder, but no two processes segment one part
            locks.append(lock_folder(output_dir, f"infer.py --part_id {part_id}",
                                     name=f".mulmodseg.part_{part_id}_of_{num_parts}.lock"))
        removed = remove_dead_temporaries(output_dir)
        if removed:
            log(removed)
        atomic_write(output_dir / DATASET_JSON, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n"))
        if num_parts > 1:
            log(f"part {part_id} of {num_parts} (0-based): {len(plan.inputs)} of the {len(inputs)} scans")
        for i, src in enumerate(plan.inputs, 1):
            t0, target = time.time(), plan.targets[src]
            reference = mdata.load_volume(src)
            record = {"case": mdata.nifti_stem(target), "modality": modality, "output": str(target), "seconds": None}
            truth = None
            if src in plan.labels:  # read before anything is written, whatever --output holds
                # Read as training reads labels: float files to integers, the run's label map applied.
                truth = mdata.read_label(mdata.load_volume(plan.labels[src]), str(plan.labels[src]), reference,
                                         label_map)
            if src in plan.done:
                if truth is not None:  # the earlier call's label map, back to training ids as a label file is read
                    label = mdata.read_label(mdata.load_volume(target), str(target), reference, label_map)
                log(f"[{i}/{len(plan.inputs)}] {src.name}: {target} exists, skipped (--skip_existing)")
            else:
                # A live window count with ETA when a person watches; a line per quarter in a log file.
                name = f"[{i}/{len(plan.inputs)}] {src.name}"
                progress = True if sys.stderr.isatty() else quarter_reporter(name, log)
                written = segment_case(ensemble, plan, src, modality, reference, inverse=inverse, largest=largest,
                                       min_component_mm3=outputs.min_component_mm3, progress=progress)
                # Scored as written: a class that the label map gives no dataset value is background in the file.
                label = written if label_map is None else mdata.apply_label_map(written,
                                                                                 mdata.parse_label_map(label_map))
                record["seconds"] = time.time() - t0
                timed = [r["seconds"] for r in records if r["seconds"] is not None] + [record["seconds"]]
                eta = np.mean(timed) * sum(1 for later in plan.inputs[i:] if later not in plan.done)
                log(f"{name} -> {target} in {record['seconds']:.1f}s, ETA {eta:.0f}s")
            complete.append(target)
            if truth is not None:
                # On the scan's grid, with its voxel sizes (the label was read onto that grid).
                spacing = nib.affines.voxel_sizes(reference.affine)
                record.update(case_metrics(label, truth, len(classes), spacing, nsd_tolerance, labelled=scored),
                              reference=str(plan.labels[src]))
            records.append(record)
        if labels_dir is not None:
            write_evaluation(records, ensemble, output_dir, modality, log, nsd_tolerance)
    except KeyboardInterrupt as exc:
        raise InferenceInterrupted(complete, [src for src in plan.inputs if plan.targets[src] not in complete]) from exc
    finally:
        for lock in locks:
            lock.release()
    return records


def segment_case(ensemble: Ensemble, plan: Plan, src: Path, modality: str, reference: nib.Nifti1Image, *,
                 inverse: dict[int, int] | None = None, largest: list[int] | None = None,
                 min_component_mm3: float | None = None, progress: Progress = False) -> np.ndarray:
    """Segment the scan ``src`` (``reference``, as loaded) and write the outputs ``plan`` asks for, the label map
    last: with it, every output of the case is there (``skip_existing``'s test). Postprocessing keeps the
    largest component of the classes ``largest`` and drops components under ``min_component_mm3``, when either
    is given. Returns the label map ``(X, Y, Z)`` as written: the dataset's values when ``inverse`` maps them."""
    spacing = nib.affines.voxel_sizes(reference.affine)
    label, probs = ensemble.segment(src, modality, probabilities=plan.probabilities, progress=progress)
    if largest is not None or min_component_mm3 is not None:
        label = postprocess(label, spacing, largest or [], min_component_mm3)
    classes = ensemble.classes
    if plan.probabilities:
        # NIfTI has no float16, so nnU-Net's habit: an .npz of (K, X, Y, Z) on the input's voxel grid.
        atomic_write(plan.path(src, "_probabilities.npz"),
                     lambda tmp: np.savez_compressed(tmp, probabilities=probs, classes=np.array(classes)))
    if plan.preview:
        write_preview(reference, label, plan.path(src, ".png"), classes)
    for k, name in plan.class_files.items():
        write_like((label == k).astype(np.uint8), reference, plan.path(src, "") / name)
    if plan.statistics:
        stats = {"case": mdata.nifti_stem(plan.targets[src]), "input": str(src), "voxel_size_mm": spacing.tolist(),
                 "classes": class_statistics(label, reference.get_fdata(dtype=np.float32), spacing, classes,
                                             written_values(len(classes), inverse))}
        atomic_write(plan.path(src, "_statistics.json"), lambda tmp: tmp.write_text(json.dumps(stats, indent=2) + "\n"))
    written = to_dataset_values(label, inverse)
    write_like(written, reference, plan.targets[src])
    return written


def write_evaluation(records: list[dict], ensemble: Ensemble, output_dir: Path, modality: str,
                     log: Callable[[str], None], nsd_tolerance: float = 2.0) -> None:
    """The reports of ``mulmodseg.metrics.write_reports`` (metrics.csv, summary.md, summary.csv,
    summary.json), with the cost of the ensemble's models together at the end of summary.md."""
    flops = 0
    for member in ensemble.members:
        window = (1, member.model.in_channels, *member.roi_size)
        # With the modality even when vision-only: it picks a UNet's per-modality normalisation statistics.
        # On the model's own device: a window's forward pass on the CPU can take minutes.
        flops += count_flops(member.model, window, modality=modality)
    windows = "+".join(dict.fromkeys("x".join(map(str, m.roi_size)) for m in ensemble.members))
    backbone = "+".join(dict.fromkeys(m.config["model"]["backbone"] for m in ensemble.members))
    timed = [r["seconds"] for r in records if r["seconds"] is not None]  # skipped cases took no time
    speed = f"{np.mean(timed):.2f} s per case on {ensemble.device}" if timed else "no case segmented in this call"
    parameters = sum(count_parameters(m.model) for m in ensemble.members)
    cost = f"parameters {parameters:,}; {flops / 1e9:.1f} GFLOPs per {windows} window; {speed}"
    settings = {"backbone": backbone, "modality": modality, "checkpoints": [str(p) for p in ensemble.paths],
                "classes": list(ensemble.classes), "nsd_tolerance_mm": nsd_tolerance,
                "sliding_window": dataclasses.asdict(ensemble.settings)}
    models = f" ensemble of {len(ensemble.members)}" if len(ensemble.members) > 1 else ""
    log(write_reports(output_dir, records, ensemble.classes[1:], f"{backbone}{models} {modality}", settings, cost))
