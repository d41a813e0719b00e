"""Inference on NIfTI files: checkpoint in, label maps on the input's own grid out, Dice if labels are given.

Each scan is preprocessed exactly as in training (settings from the checkpoint), segmented with the
sliding-window inferer, its softmax restored linearly onto the original voxel grid and argmaxed there
(``mulmodseg.data.restore_argmax``); the result is written with the input's affine, qform and sform, as
unsigned integers holding the training class ids, or the dataset's own label values when the run
used a label map. Several checkpoints (e.g. the folds of a cross-validation) segment as one
``Ensemble``, the mean of their softmax probabilities; a folder can be shared by several processes,
each segmenting its share (``input_share``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from mulmodseg import __version__
from mulmodseg import data as mdata
from mulmodseg.checkpoint import atomic_write, folder_problem, load_checkpoint
from mulmodseg.device import autocast_dtype, channels_last_inputs, resolve_device, use_channels_last
from mulmodseg.inferer import sliding_window_inference
from mulmodseg.metrics import REPORT_FILES, case_metrics, check_nsd_tolerance, count_flops, count_parameters, write_reports
from mulmodseg.model import MulModSeg
from mulmodseg.postprocess import postprocess, resolve_classes
from mulmodseg.viz import preview

DATASET_JSON = "dataset.json"


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
    """The trained network (eval mode, on ``device``) and the checkpoint's config."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    model = MulModSeg.from_config(config["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def accumulation_device(device: torch.device, num_classes: int, shape: Sequence[int], free_bytes: int
                        ) -> torch.device:
    """Where the sliding window blends a scan of ``shape`` (X, Y, Z): on the GPU when its float32 logits
    and weight map take at most a quarter of the ``free_bytes`` there (the rest is headroom for the
    windows' activations), else on the CPU. Blending on the GPU avoids copying every window's
    (K, *roi) output to the host, which would take longer than the network on a fast GPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = (num_classes + 1) * 4 * int(np.prod(shape))
    return device if 4 * need <= free_bytes else torch.device("cpu")


def output_path(image: Path, output_dir: Path, suffix: str = ".nii.gz") -> Path:
    """``scan_0000.nii.gz`` -> ``output_dir/scan.nii.gz`` (nnU-Net's channel suffix dropped)."""
    stem = mdata.nifti_stem(image) or image.name
    if stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
    return output_dir / f"{stem}{suffix}"


def label_candidates(image: Path, labels_dir: Path) -> list[Path]:
    """Where the label of ``image`` may be: nnU-Net's ``case.nii.gz`` (or ``.nii``) for ``case_0000.nii.gz``,
    else a file with the image's own name."""
    return list(dict.fromkeys([output_path(image, labels_dir), output_path(image, labels_dir, ".nii"),
                               labels_dir / image.name]))


def find_inputs(path: str | Path) -> list[Path]:
    """One NIfTI file, or every NIfTI file in a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        # Hidden files are macOS's ._ copies or a write left unfinished, never scans (as in training).
        files = sorted(p for p in path.iterdir() if p.is_file() and mdata.nifti_stem(p) and not p.name.startswith("."))
        if files:
            return files
        raise mdata.DataError([f"{path}: no .nii or .nii.gz files in this folder{mdata.not_nifti_hint(path)}"])
    raise mdata.DataError([f"{path}: no such file or folder"])


def output_dir_problems(output_dir: Path) -> list[str]:
    """Why ``output_dir`` cannot receive the outputs (empty when it can), found before any inference:
    a NIfTI file name (it is the folder the label maps go into), or a folder that cannot be written."""
    if mdata.nifti_stem(output_dir) and not output_dir.is_dir():
        return [f"--output {output_dir}: a file name, but --output is the folder the label maps go into "
                f"(each named like its scan), e.g. --output {output_dir.parent}"]
    problem = folder_problem(output_dir, "--output")
    return [problem] if problem else []


def invert_label_map(settings: dict) -> dict[int, int] | None:
    """Training id -> the dataset's label value, when the run used a label map (dropped values excluded)."""
    mapping = settings.get("label_map")
    if not mapping:
        return None
    inverse = {}
    for src, dst in mapping.items():
        if int(dst) != 0:
            inverse[int(dst)] = int(src)
    return inverse


def written_values(num_classes: int, inverse: dict[int, int] | None) -> dict[int, int]:
    """Class id (1..K-1) -> its value in the written label maps: the id itself, or the dataset's value when
    the run used a label map (``inverse``, from ``invert_label_map``); a class without one is left out (it is
    written as background)."""
    if inverse is None:
        return {k: k for k in range(1, num_classes)}
    return {k: v for k, v in sorted(inverse.items()) if 0 < k < num_classes}


def class_file(name: str) -> str:
    """The ``--per_class`` file of class ``name``: spaces as underscores (``right kidney`` -> ``right_kidney.nii.gz``)."""
    return f"{name.replace(' ', '_')}.nii.gz"


def dataset_description(classes: Sequence[str], values: dict[int, int], modality: str,
                        checkpoints: Sequence[str | Path], settings: dict) -> dict:
    """dataset.json beside the label maps, in nnU-Net's form: ``labels`` (class name -> value in the files,
    background 0), ``modality`` (v1's key) and ``channel_names`` (v2's), ``file_ending``; then the checkpoint
    (a list of them for an ensemble) and the ``settings`` that made the files, and the version that wrote
    them (which marks the file as ours)."""
    paths = [str(Path(c).resolve()) for c in checkpoints]
    return {
        "labels": {classes[0]: 0, **{classes[k]: v for k, v in values.items()}},
        "modality": {"0": modality}, "channel_names": {"0": modality}, "file_ending": ".nii.gz",
        "checkpoint": paths[0] if len(paths) == 1 else paths, "settings": settings, "mulmodseg_version": __version__,
    }


def foreign_dataset_json(path: Path) -> bool:
    """Whether ``path`` is a dataset.json that infer.py did not write (a dataset's own, e.g. an MSD datalist
    that training reads), which no --overwrite may replace."""
    if not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(content, dict) and "mulmodseg_version" in content)


def class_statistics(label: np.ndarray, image: np.ndarray, spacing: Sequence[float], classes: Sequence[str],
                     values: dict[int, int]) -> dict:
    """``--statistics`` of one case: for each class of ``values`` (class id -> value in the files), its value,
    voxel count, volume in mm^3 and mean intensity of ``image`` over it (None when the class is absent).
    ``label: (X, Y, Z)`` class ids and ``image: (X, Y, Z)`` the scan, both on the scan's grid of voxel sizes
    ``spacing`` (mm)."""
    flat = label.ravel()
    voxels = np.bincount(flat, minlength=len(classes))
    sums = np.bincount(flat, weights=image.ravel(), minlength=len(classes))
    voxel_mm3 = float(np.prod(spacing))
    return {classes[k]: {"value": v, "voxels": int(voxels[k]), "volume_mm3": float(voxels[k]) * voxel_mm3,
                         "mean_intensity": float(sums[k] / voxels[k]) if voxels[k] else None}
            for k, v in values.items()}


def to_dataset_values(label: np.ndarray, inverse: dict[int, int] | None) -> np.ndarray:
    """Training ids -> dataset values, in the smallest unsigned type that holds them (uint8 unless a
    label map's values need more): a lookup table of that type, so no 8-byte copy of the scan is made."""
    top = max(inverse.values()) if inverse else int(label.max(initial=0))
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    if not inverse:
        return label.astype(dtype, copy=False)
    lut = np.zeros(max(max(inverse), int(label.max(initial=0))) + 1, dtype=dtype)
    for dst, src in inverse.items():
        lut[dst] = src
    return lut[label]


def write_like(array: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """Save the label map ``array`` on ``reference``'s grid: same affine, qform/sform and codes, voxel
    sizes and units; no intensity scaling, display range, intent or description of the scan."""
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    # A scan's display window (e.g. cal_min -1000, cal_max 2000 HU) would show labels 1..13 as black.
    header["cal_min"], header["cal_max"] = 0, 0
    header.set_intent("none")
    header["descrip"] = b"mulmodseg labels"
    out = nib.Nifti1Image(array, reference.affine, header)
    out.set_qform(reference.get_qform(), int(reference.header["qform_code"]))
    out.set_sform(reference.get_sform(), int(reference.header["sform_code"]))
    out.header.set_slope_inter(1.0, 0.0)
    atomic_write(path, lambda tmp: nib.save(out, tmp))


def write_preview(reference: nib.Nifti1Image, label: np.ndarray, path: Path) -> None:
    """The label map over the scan as a PNG, both turned to RAS so the view is radiological."""
    image = nib.as_closest_canonical(reference)
    label = nib.as_closest_canonical(nib.Nifti1Image(label, reference.affine))
    atomic_write(path, lambda tmp: preview(np.asanyarray(image.dataobj, dtype=np.float32),
                                                np.asanyarray(label.dataobj), tmp, spacing=image.header.get_zooms()[:3]))


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
        self.roi_size = tuple(self.config["roi_size"])
        self.classes = self.config["classes"]
        self.modalities = list(self.config["preprocess"])
        # Test-time mirroring averages only the mirrors the model learned to be invariant to.
        self.mirror_axes = tuple(self.config.get("train", {}).get("mirror_axes", ()))
        if self.settings.tta and not self.mirror_axes:
            raise ValueError(f"--tta: {checkpoint} was trained without mirroring (train.py --mirror_axes), so its "
                             "mirrored predictions would not agree with the plain one (left/right organs swap "
                             "sides); leave out --tta, or train with e.g. --mirror_axes 0 1 2")
        self.flip_channel_order = {0: mdata.left_right_order(self.classes)} if 0 in self.mirror_axes else {}

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
            progress=progress, tta_flips=self.mirror_axes if s.tta else (), flip_channel_order=self.flip_channel_order,
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
            return mdata.restore_argmax(mean, meta), restore_probabilities(mean, meta) if probabilities else None
        restored = sum(restore_probabilities(mean, meta, np.float32) * count for mean, meta, count in means)
        restored /= len(self.members)
        return restored.argmax(0).astype(np.uint8), restored.astype(np.float16) if probabilities else None


def restore_probabilities(probs: np.ndarray, meta: dict, dtype: type = np.float16) -> np.ndarray:
    """Softmax (K, X, Y, Z) on the training grid -> (K, *original shape) of ``dtype`` on the scan's grid,
    linearly, channel by channel (one float32 copy of a channel at a time); outside the foreground crop
    background, probability 1 for class 0 and 0 for the others."""
    restored = np.empty((len(probs), *meta["original_shape"]), dtype=dtype)
    for k, channel in enumerate(probs):
        restored[k] = mdata.restore(channel, meta, "linear", fill=1.0 if k == 0 else 0.0)
    return restored


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0 of ``logits: (K, X, Y, Z)``, in place: a whole scan's logits are the largest
    array of inference, and a second copy of them would raise its peak memory by as much."""
    logits -= logits.max(0, keepdim=True).values
    logits.exp_()
    logits /= logits.sum(0, keepdim=True)
    return logits


def quarter_reporter(name: str, log: Callable[[str], None]) -> Callable[[int, int], None]:
    """A sliding-window ``progress(done, total)`` that logs ``name``'s window count and ETA as it passes
    25, 50 and 75% (a log file gets a few lines, not a live counter)."""
    started, logged = time.monotonic(), [0]

    def report(done: int, total: int) -> None:
        quarter = 4 * done // total
        if 0 < quarter < 4 and quarter > logged[0]:
            logged[0] = quarter
            eta = (time.monotonic() - started) / done * (total - done)
            log(f"{name}: {done}/{total} windows, ETA {eta:.0f}s")

    return report


def input_share(inputs: Sequence[Path], num_parts: int = 1, part_id: int = 0) -> list[Path]:
    """Part ``part_id`` (0-based) of ``num_parts`` of ``inputs``: every ``num_parts``-th scan by sorted file
    name, from the ``part_id``-th on, so that processes given the same list share it without overlap."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"--num_parts {num_parts} --part_id {part_id}: need --num_parts >= 1 and "
                         f"0 <= --part_id < --num_parts")
    return sorted(inputs, key=lambda p: (p.name, str(p)))[part_id::num_parts]


def segment_files(
    checkpoint: str | Path | Sequence[str | Path],
    inputs: Sequence[Path],
    output_dir: str | Path,
    modality: str,
    settings: InferenceSettings | None = None,
    overwrite: bool = False,
    save_probabilities: bool = False,
    previews: bool = False,
    labels_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
    skip_existing: bool = False,
    nsd_tolerance: float = 2.0,
    keep_largest: Sequence[str] | None = None,
    min_component_mm3: float | None = None,
    per_class: bool = False,
    statistics: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
) -> list[dict]:
    """Segment ``inputs`` into ``output_dir`` with the ``Ensemble`` of ``checkpoint`` (one path or several);
    returns one record per case (with Dice, NSD at ``nsd_tolerance`` mm and HD95,
    ``mulmodseg.metrics.case_metrics``, when labels are given).

    Each label map is postprocessed on the scan's grid when asked (``mulmodseg.postprocess.postprocess``:
    ``keep_largest`` names the classes that keep only their largest component, an empty list all of them;
    ``min_component_mm3`` removes smaller components), then written, and scored as written. Beside the
    label maps goes ``dataset.json`` (``dataset_description``); per case, optionally, the probabilities
    (not postprocessed), a preview, one binary map per class (``per_class``: ``NAME/<class>.nii.gz``) and
    ``NAME_statistics.json`` (``statistics``: ``class_statistics``).

    Before any inference: the checkpoint loads, the modality and the ``keep_largest`` classes are ones it
    knows, ``output_dir`` can be written, no output would replace an input scan or label file or a
    dataset.json that this function did not write (even with ``overwrite``) or, without ``overwrite`` or
    ``skip_existing``, an existing file (label maps, every extra output asked for, dataset.json,
    evaluation tables), and every scan and label passes ``mulmodseg.data.check_cases`` (readable, 3D,
    finite, label values known); all problems at once. ``skip_existing`` continues an interrupted call: a
    case whose outputs all exist is not segmented (nor postprocessed) again, its label map is read back
    for the evaluation, the others are segmented, and dataset.json and the evaluation tables are written
    anew. Ctrl-C while the cases run raises ``InferenceInterrupted``.

    ``num_parts`` > 1 segments only share ``part_id`` of ``inputs`` (``input_share``), so that that many
    processes fill one ``output_dir``: each writes the same dataset.json (an existing one is no conflict
    then), none scores (``labels_dir`` is refused: score the whole folder once every part is done).
    """
    output_dir = Path(output_dir)
    everything = [Path(p) for p in inputs]
    inputs = input_share(everything, num_parts, part_id)
    check_nsd_tolerance(nsd_tolerance)  # before the checkpoint loads
    if min_component_mm3 is not None and not min_component_mm3 > 0:
        raise ValueError(f"--min_component_mm3 {min_component_mm3}: must be a volume above 0 mm^3")
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
    largest = [] if keep_largest is None else resolve_classes(keep_largest, classes, values)
    targets = {p: output_path(p, output_dir) for p in inputs}
    extras = [suffix for suffix, wanted in (("_probabilities.npz", save_probabilities), (".png", previews),
                                            ("_statistics.json", statistics)) if wanted]
    class_files = [class_file(classes[k]) for k in values] if per_class else []
    problems, writers, label_files = output_dir_problems(output_dir), {}, {}
    for src in everything:  # over every part's scans: two parts must not write one file either
        dst = output_path(src, output_dir)
        if dst in writers:
            problems.append(f"{src}: would write {dst}, as {writers[dst]} does; rename one of them")
        writers.setdefault(dst, src)
    if labels_dir is not None:
        for src in inputs:
            found = [p for p in label_candidates(src, Path(labels_dir)) if p.is_file()]
            if not found:
                problems.append(f"{src}: no label file with this name in {labels_dir}")
            else:
                label_files[src] = found[0]
    # X_0001 beside X_0000 may be nnU-Net's second channel of X (training refuses it) or a scan of its own
    # (scans numbered from 0): segmented as a scan, with a word.
    stems = {mdata.nifti_stem(p): p for p in inputs}
    label_stems = {mdata.nifti_stem(p) for p in label_files.values()}
    channel_warnings = [f"{path}: segmented as a scan of its own, but beside {stem[:-5]}_0000 it may be nnU-Net's "
                        f"channel {stem[-4:]} of one case; this model takes one channel" for stem, path in stems.items()
                        if mdata.is_extra_channel(stem, stems, label_stems)]
    # Scans and labels are never written over, even with --overwrite.
    given = {p.resolve(): "scan" for p in inputs} | {p.resolve(): "label file" for p in label_files.values()}
    # Nothing else this call would write may already exist: dataset.json, and write_evaluation's tables when
    # labels are given.
    outputs = [] if labels_dir is None else [output_dir / n for n in REPORT_FILES]
    if foreign_dataset_json(output_dir / DATASET_JSON):
        problems.append(f"{output_dir / DATASET_JSON}: not written by infer.py (a dataset's own description?), so it "
                        "is never replaced, even with --overwrite; choose another --output")
    elif num_parts == 1:  # the parts of a shared folder each write the same dataset.json
        outputs.append(output_dir / DATASET_JSON)
    done = set()
    for src, dst in targets.items():
        case_outputs = [dst, *(output_path(src, output_dir, suffix) for suffix in extras),
                        *(output_path(src, output_dir, "") / name for name in class_files)]
        outputs += case_outputs
        if skip_existing and all(p.is_file() for p in case_outputs):
            done.add(src)
    for path in outputs:
        if path.resolve() in given:
            problems.append(f"{path}: the output would replace an input {given[path.resolve()]}; choose another --output")
        elif path.exists() and not (overwrite or skip_existing):
            problems.append(f"{path}: exists; pass --overwrite to replace it, or --skip_existing to keep it")
    if problems:
        raise mdata.DataError(problems)
    label_map = ensemble.config["preprocess"][modality].get("label_map")
    cases = [mdata.Case(targets[src].name, src, label_files.get(src), modality) for src in inputs]
    num_classes = None if label_map else len(classes)
    for warning in channel_warnings + mdata.check_cases(cases, label_map=label_map, num_classes=num_classes):
        log(f"warning: {warning}")

    # Written before the first case: every label map in output_dir has its classes beside it.
    run_settings = {"modality": modality, "sliding_window": dataclasses.asdict(ensemble.settings),
                    "keep_largest": [classes[k] for k in largest] if keep_largest is not None else None,
                    "min_component_mm3": min_component_mm3, "per_class": per_class, "statistics": statistics,
                    "save_probabilities": save_probabilities}
    description = dataset_description(classes, values, modality, checkpoints, run_settings)
    atomic_write(output_dir / DATASET_JSON, lambda tmp: tmp.write_text(json.dumps(description, indent=2) + "\n"))
    if num_parts > 1:
        log(f"part {part_id} of {num_parts} (0-based): {len(inputs)} of the {len(everything)} scans")
    records, complete = [], []
    try:
        for i, src in enumerate(inputs, 1):
            t0 = time.time()
            reference = mdata.load_volume(src)
            spacing = nib.affines.voxel_sizes(reference.affine)
            record = {"case": mdata.nifti_stem(targets[src]), "modality": modality, "output": str(targets[src]),
                      "seconds": None}
            truth = None
            if src in label_files:  # read before anything is written, whatever --output holds
                # Read as training reads labels: float files to integers, the run's label map applied.
                truth = mdata.read_label(mdata.load_volume(label_files[src]), str(label_files[src]), reference, label_map)
            if src in done:
                if truth is not None:  # the earlier call's label map, back to training ids as a label file is read
                    label = mdata.read_label(mdata.load_volume(targets[src]), str(targets[src]), reference, label_map)
                complete.append(targets[src])
                log(f"[{i}/{len(inputs)}] {src.name}: {targets[src]} exists, skipped (--skip_existing)")
            else:
                # A live window count with ETA when a person watches; a line per quarter in a log file.
                progress = True if sys.stderr.isatty() else quarter_reporter(f"[{i}/{len(inputs)}] {src.name}", log)
                label, probs = ensemble.segment(src, modality, probabilities=save_probabilities, progress=progress)
                if keep_largest is not None or min_component_mm3 is not None:
                    label = postprocess(label, spacing, largest, min_component_mm3)
                written = to_dataset_values(label, inverse)
                if save_probabilities:
                    # NIfTI has no float16, so nnU-Net's habit: an .npz of (K, X, Y, Z) on the input's voxel grid.
                    atomic_write(output_path(src, output_dir, "_probabilities.npz"), lambda tmp: np.savez_compressed(
                        tmp, probabilities=probs, classes=np.array(classes)))
                if previews:
                    write_preview(reference, label, output_path(src, output_dir, ".png"))
                if per_class:
                    for k in values:
                        write_like((label == k).astype(np.uint8), reference,
                                   output_path(src, output_dir, "") / class_file(classes[k]))
                if statistics:
                    stats = {"case": record["case"], "input": str(src), "voxel_size_mm": spacing.tolist(),
                             "classes": class_statistics(label, reference.get_fdata(dtype=np.float32), spacing,
                                                         classes, values)}
                    atomic_write(output_path(src, output_dir, "_statistics.json"),
                                      lambda tmp: tmp.write_text(json.dumps(stats, indent=2) + "\n"))
                # The label map last: with it, every output of the case is there (--skip_existing's test).
                write_like(written, reference, targets[src])
                complete.append(targets[src])
                # Scored as written: a class that the label map gives no dataset value is background in the file.
                label = written if label_map is None else mdata.apply_label_map(written, mdata.parse_label_map(label_map))
                record["seconds"] = time.time() - t0
                timed = [r["seconds"] for r in records if r["seconds"] is not None] + [record["seconds"]]
                eta = np.mean(timed) * sum(1 for later in inputs[i:] if later not in done)
                log(f"[{i}/{len(inputs)}] {src.name} -> {targets[src]} in {record['seconds']:.1f}s, ETA {eta:.0f}s")
            if truth is not None:
                # On the scan's grid, with its voxel sizes (the label was read onto that grid).
                record.update(case_metrics(label, truth, len(classes), spacing, nsd_tolerance))
                record["reference"] = str(label_files[src])
            records.append(record)
        if labels_dir is not None:
            write_evaluation(records, ensemble, output_dir, modality, log, nsd_tolerance)
    except KeyboardInterrupt as exc:
        raise InferenceInterrupted(complete, [src for src in inputs if targets[src] not in complete]) from exc
    return records


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
