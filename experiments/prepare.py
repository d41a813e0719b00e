"""Lay out AMOS or MMWHS, as downloaded, into the folders the recipes train and test on (symbolic links).

    python experiments/prepare.py amos --src /data/amos22 --out data/amos_prepared
    python experiments/prepare.py mmwhs --src /data/mmwhs --out data/mmwhs_prepared

Every output folder is an MSD layout that train.py and infer.py read: ``imagesTr``/``labelsTr`` for
training, ``imagesTs``/``labelsTs`` for testing, one link per file, named by case id. The draw is
seeded (``--seed``) and written to ``split.json``; the original files are never modified.

AMOS (its ``dataset.json``; the ``training`` and, when present, ``validation`` lists, which are the
labelled scans; ids <= 500 are CT, > 500 MR): per modality 19 test scans and 35 training scans (the
paper's balanced 54 + 54), plus ``ct_x2``/``ct_x3`` with 70 and 105 CT training scans for the CT:MR
ratio table; each larger set contains the smaller one, and none contains a test scan. Labels 14 and
15 are dropped at training time by the recipes' label map (``experiments/recipes.py``).

MMWHS (the challenge's ``ct_train_1001_image.nii.gz`` / ``ct_train_1001_label.nii.gz`` files, in any
sub-folders): ``ct``/``mr`` with 75 % training and 25 % test scans; ``mr_all`` with every MR scan for
training, and ``cv0``/``cv1``, a two-fold split of the CT scans (train on one half, test on the other).
Label values 205 ... 850 are mapped to 1 ... 7 at training time by the recipes' label map.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mulmodseg import data as mdata  # noqa: E402
from mulmodseg.cli import HelpFormatter  # noqa: E402

MMWHS_FILE = re.compile(r"^(ct|mr)_train_(\d+)_(image|label)\.nii(\.gz)?$")


def link_cases(cases: list[mdata.Case], folder: Path, images: str, labels: str) -> list[str]:
    """Link each case's image and label into ``folder/images`` and ``folder/labels``; returns the ids."""
    for case in cases:
        for source, sub in ((case.image, images), (case.label, labels)):
            target = folder / sub / f"{case.id}{'.nii.gz' if str(source).endswith('.gz') else '.nii'}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(source).resolve(), target)
    return sorted(case.id for case in cases)


def check_files(cases: list[mdata.Case]) -> None:
    """Raise DataError listing every image or label that does not exist."""
    problems = [f"{path}: file not found" for c in cases for path in (c.image, c.label)
                if path is None or not Path(path).is_file()]
    if problems:
        raise mdata.DataError(problems)


def prepare_amos(src: Path, out: Path, seed: int = 0, n_train: int = 35, n_test: int = 19,
                 ratios: tuple[int, ...] = (2, 3)) -> dict:
    """AMOS -> ``out/{ct,mr}`` (train + test) and ``out/ct_x{r}`` (r * n_train CT); returns the split."""
    pools: dict[str, dict[str, mdata.Case]] = {"CT": {}, "MR": {}}
    for split in ("train", "val"):
        try:
            found = mdata.discover_amos(src, split)
        except mdata.DataError:
            if split == "train":
                raise
            continue  # no labelled validation list
        for modality, cases in found.items():
            pools[modality].update({c.id: c for c in cases})
    need = {"CT": n_test + n_train * max((1, *ratios)), "MR": n_test + n_train}
    short = [f"{m}: {len(pools[m])} labelled scans, the recipes need {need[m]}"
             for m in pools if len(pools[m]) < need[m]]
    if short:
        raise mdata.DataError(short)
    rng = np.random.default_rng(seed)
    split = {"source": str(src), "seed": seed, "folders": {}}
    for modality, pool in pools.items():
        ids = sorted(pool)
        order = [ids[i] for i in rng.permutation(len(ids))[: need[modality]]]
        test, train = [pool[i] for i in order[:n_test]], [pool[i] for i in order[n_test:]]
        check_files(test + train)
        name = modality.lower()
        split["folders"][f"{name}/imagesTs"] = link_cases(test, out / name, "imagesTs", "labelsTs")
        split["folders"][f"{name}/imagesTr"] = link_cases(train[:n_train], out / name, "imagesTr", "labelsTr")
        if modality == "CT":
            for r in ratios:
                folder = f"ct_x{r}"
                split["folders"][f"{folder}/imagesTr"] = link_cases(train[: r * n_train], out / folder,
                                                                    "imagesTr", "labelsTr")
    return split


def find_mmwhs(src: Path) -> dict[str, list[mdata.Case]]:
    """{"CT": [...], "MR": [...]} from the challenge's ``<mod>_train_<n>_image|label.nii[.gz]`` files."""
    files: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(src.rglob("*_train_*")):
        match = MMWHS_FILE.match(path.name)
        if match and path.is_file():
            files.setdefault((match[1], match[2]), {})[match[3]] = path
    problems = [f"{next(iter(f.values()))}: no matching {'label' if 'image' in f else 'image'} file"
                for f in files.values() if len(f) != 2]
    if not files:
        problems.append(f"{src}: no files named like ct_train_1001_image.nii.gz / ct_train_1001_label.nii.gz")
    if problems:
        raise mdata.DataError(problems)
    cases: dict[str, list[mdata.Case]] = {"CT": [], "MR": []}
    for (mod, number), pair in sorted(files.items()):
        cases[mod.upper()].append(mdata.Case(f"{mod}_train_{number}", pair["image"], pair["label"], mod.upper()))
    return cases


def prepare_mmwhs(src: Path, out: Path, seed: int = 0, test_fraction: float = 0.25) -> dict:
    """MMWHS -> ``out/{ct,mr}`` (75 / 25), ``out/mr_all`` and ``out/cv{0,1}/ct`` (two-fold CT); returns the split."""
    cases = find_mmwhs(src)
    short = [f"{m}: {len(c)} scans, need at least 2" for m, c in cases.items() if len(c) < 2]
    if short:
        raise mdata.DataError(short)
    split = {"source": str(src), "seed": seed, "folders": {}}
    for modality, found in cases.items():
        name = modality.lower()
        train, test = mdata.split_cases(found, test_fraction, seed)
        split["folders"][f"{name}/imagesTr"] = link_cases(train, out / name, "imagesTr", "labelsTr")
        split["folders"][f"{name}/imagesTs"] = link_cases(test, out / name, "imagesTs", "labelsTs")
    split["folders"]["mr_all/imagesTr"] = link_cases(cases["MR"], out / "mr_all", "imagesTr", "labelsTr")
    for fold in (0, 1):
        train, test = mdata.kfold_split(cases["CT"], 2, fold, seed)
        split["folders"][f"cv{fold}/ct/imagesTr"] = link_cases(train, out / f"cv{fold}" / "ct", "imagesTr", "labelsTr")
        split["folders"][f"cv{fold}/ct/imagesTs"] = link_cases(test, out / f"cv{fold}" / "ct", "imagesTs", "labelsTs")
    return split


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lay out AMOS or MMWHS for the paper's recipes (links, never copies).")
    sub = p.add_subparsers(dest="dataset", required=True)
    amos = sub.add_parser("amos", help="AMOS 2022 (folder with dataset.json, imagesTr, labelsTr, ...)",
                          formatter_class=HelpFormatter)
    amos.add_argument("--train", type=int, default=35, help="training scans per modality (balanced)")
    amos.add_argument("--test", type=int, default=19, help="test scans per modality")
    amos.add_argument("--ratios", type=int, nargs="*", default=[2, 3],
                      help="also lay out ct_xR with R * --train CT scans")
    mmwhs = sub.add_parser("mmwhs", help="MMWHS 2017 (ct_train_1001_image.nii.gz, ... in any sub-folders)",
                           formatter_class=HelpFormatter)
    mmwhs.add_argument("--test_fraction", type=float, default=0.25, help="share of each modality held out for testing")
    for q in (amos, mmwhs):
        q.add_argument("--src", required=True, help="the unpacked download")
        q.add_argument("--out", required=True, help="new folder for the layout (must not exist or be empty)")
        q.add_argument("--seed", type=int, default=0, help="seed of the draw")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new --out", file=sys.stderr)
        return 2
    try:
        if args.dataset == "amos":
            split = prepare_amos(src, out, args.seed, args.train, args.test, tuple(args.ratios))
        else:
            split = prepare_mmwhs(src, out, args.seed, args.test_fraction)
    except mdata.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "split.json").write_text(json.dumps(split, indent=1))
    for folder, ids in split["folders"].items():
        print(f"{out / folder}: {len(ids)} scans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
