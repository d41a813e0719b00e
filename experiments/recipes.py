"""The paper's experiments as data: one list of training runs per table, each with its evaluations.

A run is trained with ``train.py`` at the paper's settings, which are train.py's defaults (96^3 crops,
1000 epochs with 10 warm-up, AdamW 1e-3 / 1e-4, 1.5 x 1.5 x 2.0 mm, CT window [-125, 275] HU as in the
reference code, whose paper text says [-275, 125]), plus the reference code's CT augmentation
(``REFERENCE_AUGMENTATION``: rotation up to 6 degrees about S/I and scaling by 1 +- 0.1 on every CT
crop, none on MR), which train.py leaves off by default; a recipe
only says what differs between runs: dataset folders, backbone, text embedding and training mode.
Each evaluation is one ``infer.py`` call on a prepared test folder (``imagesTs`` + ``labelsTs``).

Runs that several tables share (Table 6 reuses Table 2's AMOS UNet runs, Tables 5, 7 and 8 reuse its
CLIP V3 ALT run) have the same name and so the same run directory: ``run.py`` trains each once.

Tables are numbered by experiment here, not by the paper's own numbering: 1 text embeddings, 2 AMOS,
3 MMWHS, 4 MMWHS cross-modality, 5 CT:MR ratios, 6 ablation grid, 7 wrong-modality prompts, 8 cost.
The paper's numbers are its reported averages (MulModSeg, WACV 2025: Dice %, and for Table 8 millions
of parameters and seconds per case on an A100).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKBONES = {"unet": "UNet", "swinunetr": "SwinUNETR"}

# Every nonzero label value must be listed (train.py refuses unmapped values, so a typo cannot erase an
# organ): AMOS keeps its 13 organs and drops 14 (bladder) and 15 (prostate/uterus).
AMOS_LABEL_MAP = ",".join([f"{v}:{v}" for v in range(1, 14)] + ["14:0", "15:0"])
MMWHS_LABEL_MAP = "205:1,420:2,500:3,550:4,600:5,820:6,850:7"

# The reference's RandAffine on CT crops only: prob 1.0, rotate_range (0, 0, pi/30), scale_range 0.1.
REFERENCE_AUGMENTATION = ("--rotate_degrees", "6", "--scale_range", "0.1", "--warp_modalities", "CT",
                          "--warp_prob", "1")

# dataset name -> (--classes, --label_map, folder of each modality in the prepared layout)
DATASETS = {
    "amos": ("amos", AMOS_LABEL_MAP, {"CT": "ct", "MR": "mr"}),
    "mmwhs": ("mmwhs", MMWHS_LABEL_MAP, {"CT": "ct", "MR": "mr"}),
}

# Text embeddings by name: train.py's --text for the built-in ones; "clip-vN" is a CLIP table built with
# template vN; the others are user-made table files (``run.py --embedding NAME=PATH``).
TEXT_LABELS = {
    "none": "vision-only", "onehot": "one-hot", "clip-v1": "CLIP V1", "clip-v2": "CLIP V2",
    "clip-v3": "CLIP V3", "biobert": "BioBERT", "medclip": "MedCLIP",
}  # fmt: skip
USER_TABLES = ("biobert", "medclip")
MODE_LABELS = {"CT": "CT only", "MR": "MR only", "alt": "ALT", "mix": "mixed batches"}


@dataclass(frozen=True)
class Eval:
    """One infer.py evaluation: test scans of ``modality`` from ``folder`` (default: the dataset's folder for
    that modality), reported in table column ``column``; ``prompt`` is --prompt_modality."""

    modality: str
    column: str
    prompt: str | None = None
    folder: str | None = None


@dataclass(frozen=True)
class Run:
    """One training run and its evaluations, as one row (or, with ``row`` shared, part of a row) of a table.

    folders: modality -> training folder inside the prepared dataset (default: DATASETS' folders).
    paper: column -> the paper's average for this row, where the paper's table gives one.
    """

    row: str
    dataset: str
    backbone: str
    text: str
    mode: str
    evals: tuple[Eval, ...]
    folders: tuple[tuple[str, str], ...] = ()
    paper: tuple[tuple[str, float], ...] = ()

    def training_folders(self) -> dict[str, str]:
        """modality -> folder, the defaults overridden by ``folders``."""
        return {**DATASETS[self.dataset][2], **dict(self.folders)}

    @property
    def name(self) -> str:
        """Run directory name: same training settings, same name (so tables share runs)."""
        defaults = DATASETS[self.dataset][2]
        variants = [f.replace("/", "_") for m, f in self.training_folders().items() if f != defaults.get(m)]
        return "-".join([self.backbone, self.text, self.mode, *variants])


@dataclass(frozen=True)
class Table:
    """A table of the paper: its runs, and whether it reports Dice (``dice``) or model cost (``cost``)."""

    title: str
    runs: tuple[Run, ...]
    kind: str = "dice"
    paper: dict = field(default_factory=dict)  # cost tables: row -> {"params_m": .., "seconds": ..}


BOTH = (Eval("CT", "CT"), Eval("MR", "MR"))


def _p(**values: float) -> tuple[tuple[str, float], ...]:
    return tuple(values.items())


def label(backbone: str, text: str, mode: str) -> str:
    """Row label such as ``UNet, CLIP V3, ALT``."""
    return f"{BACKBONES[backbone]}, {TEXT_LABELS[text]}, {MODE_LABELS[mode]}"


# Paper averages per (dataset, backbone, text, mode): column -> Dice %.
PAPER_MAIN = {
    ("amos", "unet", "none", "CT"): _p(CT=81.23),
    ("amos", "unet", "none", "MR"): _p(MR=78.85),
    ("amos", "unet", "none", "alt"): _p(CT=82.50, MR=81.91),
    ("amos", "unet", "clip-v3", "CT"): _p(CT=86.40, MR=69.72),
    ("amos", "unet", "clip-v3", "MR"): _p(CT=60.53, MR=82.70),
    ("amos", "unet", "clip-v3", "alt"): _p(CT=87.14, MR=85.33),
    ("amos", "swinunetr", "none", "CT"): _p(CT=85.06),
    ("amos", "swinunetr", "none", "MR"): _p(MR=80.70),
    ("amos", "swinunetr", "none", "alt"): _p(CT=85.02, MR=82.08),
    ("amos", "swinunetr", "clip-v3", "alt"): _p(CT=86.15, MR=83.37),
    ("mmwhs", "unet", "clip-v3", "alt"): _p(CT=91.67, MR=85.15),
    ("mmwhs", "swinunetr", "clip-v3", "alt"): _p(CT=91.44, MR=83.85),
}


def main_table(dataset: str, title: str) -> Table:
    """Tables 2 and 3: per backbone, vision-only and CLIP V3, trained on CT only, MR only or ALT; every
    run is tested on both modalities (a single-modality model on the other one is the paper's cross test)."""
    runs = tuple(
        Run(label(b, t, m), dataset, b, t, m, BOTH, paper=PAPER_MAIN.get((dataset, b, t, m), ()))
        for b in BACKBONES
        for t in ("none", "clip-v3")
        for m in ("CT", "MR", "alt")
    )
    return Table(title, runs)


def _amos_unet(text: str, mode: str, row: str, evals=BOTH, folders=(), paper=None) -> Run:
    return Run(row, "amos", "unet", text, mode, evals, folders,
               PAPER_MAIN.get(("amos", "unet", text, mode), ()) if paper is None else paper)


TABLES: dict[str, Table] = {
    "table1": Table(
        "Table 1: text embeddings (AMOS, UNet, ALT)",
        tuple(
            _amos_unet(t, "alt", TEXT_LABELS[t], paper=paper)
            for t, paper in [
                ("none", _p(CT=82.50, MR=81.91)), ("onehot", _p(CT=86.64, MR=84.50)),
                ("clip-v1", _p(CT=85.60, MR=84.30)), ("clip-v2", _p(CT=86.20, MR=84.70)),
                ("clip-v3", _p(CT=87.14, MR=85.33)), ("biobert", _p(CT=86.62, MR=84.59)),
                ("medclip", _p(CT=86.30, MR=84.10)),
            ]
        ),
    ),
    "table2": main_table("amos", "Table 2: AMOS, 35 train / 19 test scans per modality"),
    "table3": main_table("mmwhs", "Table 3: MMWHS, 15 train / 5 test scans per modality (75 % / 25 %)"),
    "table4": Table(
        "Table 4: MMWHS cross-modality, 20 MR + 10 CT training, two-fold cross-validation on CT",
        tuple(
            Run(BACKBONES[b], "mmwhs", b, "clip-v3", "alt", (Eval("CT", "CT", folder=f"cv{fold}/ct"),),
                folders=(("CT", f"cv{fold}/ct"), ("MR", "mr_all")), paper=_p(CT=paper))
            for b, paper in (("unet", 92.72), ("swinunetr", 93.31))
            for fold in (0, 1)
        ),
    ),
    "table5": Table(
        "Table 5: CT:MR training ratio (AMOS, UNet, CLIP V3, ALT; 35 MR)",
        tuple(
            _amos_unet("clip-v3", "alt", ratio, folders=folders, paper=paper)
            for ratio, folders, paper in [
                ("1:1 (35 CT)", (), _p(CT=87.14, MR=85.33)),
                ("2:1 (70 CT)", (("CT", "ct_x2"),), _p(CT=87.82, MR=85.38)),
                ("3:1 (105 CT)", (("CT", "ct_x3"),), _p(CT=88.92, MR=85.49)),
            ]
        ),
    ),
    "table6": Table(
        "Table 6: ablation, text embedding x training scheme (AMOS, UNet)",
        tuple(
            run
            for t in ("none", "clip-v3")
            for run in (
                _amos_unet(t, "CT", f"{TEXT_LABELS[t]}, own modality", (Eval("CT", "CT"),)),
                _amos_unet(t, "MR", f"{TEXT_LABELS[t]}, own modality", (Eval("MR", "MR"),)),
                _amos_unet(t, "mix", f"{TEXT_LABELS[t]}, mixed batches (not in the paper)"),
                _amos_unet(t, "alt", f"{TEXT_LABELS[t]}, ALT"),
            )
        ),
    ),
    "table7": Table(
        "Table 7: prompts of the wrong modality at test time (AMOS, UNet, CLIP V3, ALT)",
        (
            _amos_unet("clip-v3", "alt", "own modality's prompts"),
            _amos_unet("clip-v3", "alt", "other modality's prompts",
                       (Eval("CT", "CT", prompt="MR"), Eval("MR", "MR", prompt="CT")), paper=_p(CT=86.37, MR=85.10)),
        ),
    ),
    "table8": Table(
        "Table 8: parameters, GFLOPs per 96^3 window and seconds per case (AMOS CT test set)",
        tuple(
            Run(label(b, t, "alt"), "amos", b, t, "alt", (Eval("CT", "CT"),))
            for b in BACKBONES
            for t in ("clip-v3", "none")
        ),
        kind="cost",
        paper={
            label("unet", "clip-v3", "alt"): {"params_m": 19.4, "seconds": 3.27},
            label("unet", "none", "alt"): {"params_m": 19.1, "seconds": 2.40},
            label("swinunetr", "clip-v3", "alt"): {"params_m": 62.6, "seconds": 4.20},
            label("swinunetr", "none", "alt"): {"params_m": 62.2, "seconds": 3.39},
        },
    ),
}
