"""Run the paper's experiments: ``python experiments/run.py TABLE [TABLE ...] --amos DIR --mmwhs DIR --out runs/paper``.

For each table of ``experiments/recipes.py`` this builds the text-embedding tables it needs
(``python -m mulmodseg.text``), trains every run (``train.py``) and evaluates it on the prepared test
folders (``infer.py --labels``, which writes ``metrics.csv``), then records in ``OUT/manifest.json``
which evaluation fills which cell, for ``experiments/collect.py``. Finished steps are skipped, an
interrupted training is resumed, so the same command continues a stopped campaign.

``--folds N`` trains every run as an N-fold cross-validation over its training scans (``train.py --fold K
--num_folds N``, the folds in ``RUN/fold_K`` sharing ``RUN/splits.json``), evaluates the ensemble of the N
fold models on the test folders, and lists the folds in the manifest, for collect.py's cross-validation
table (the paper tunes its settings by two-fold cross-validation).

``--dry_run`` prints the commands instead of running them (to run them by hand, e.g. under torchrun).
``--smoke`` swaps the data for the bundled sample (test scans = training scans) and uses tiny settings,
and replaces every CLIP or user table by a random table of the same shape, so that every recipe runs
end to end in seconds without weights or downloads; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the experiments package (and mulmodseg, when not installed) live there
    sys.path.insert(0, str(ROOT))

from experiments.recipes import BACKBONES, DATASETS, REFERENCE_AUGMENTATION, TABLES, USER_TABLES, Eval, Run  # noqa: E402

SAMPLE = ROOT / "data" / "sample"
SAMPLE_FOLDERS = {"CT": "ct", "MR": "mr"}
# The sample carries AMOS label ids 1..13: the MMWHS smoke runs keep 1..7 as the 7 heart classes.
SMOKE_LABEL_MAPS = {"mmwhs": ",".join([f"{v}:{v}" for v in range(1, 8)] + [f"{v}:0" for v in range(8, 14)])}
SMOKE_TRAIN = ["--roi_size", "32", "--spacing", "11", "11", "11", "--epochs", "1", "--num_samples", "1",
               "--num_workers", "0"]
SMOKE_WIDTH = {"unet": ["--base_channels", "4"], "swinunetr": ["--feature_size", "12"]}
USER_TABLE_DIMS = {"biobert": 768, "medclip": 512}  # the stand-in's width in smoke runs


@dataclass
class Step:
    """One command: ``kind`` is "table", "train" or "infer"; ``out`` is what it produces."""

    kind: str
    argv: list[str]
    out: Path
    random_table: tuple | None = None  # smoke: (classes, template or None, dim) of a random table

    def command(self) -> str:
        """The shell command a user would type."""
        if self.random_table is not None:
            return f"# smoke: a random {self.random_table[2]}-d table of CLIP's shape -> {self.out}"
        program = {"table": "python -m mulmodseg.text", "train": "python train.py", "infer": "python infer.py"}
        return f"{program[self.kind]} {shlex.join(self.argv)}"


@dataclass
class Plan:
    """Every step to run, in order, and the manifest of table cells -> evaluation folders."""

    steps: list[Step] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train and evaluate the runs of the paper's tables (see experiments/README.md).",
        epilog="Extra train.py flags go after --, e.g. -- --num_workers 8",
    )
    p.add_argument("tables", nargs="+", metavar="TABLE", help=f"table names ({', '.join(TABLES)}) or all")
    p.add_argument("--amos", help="AMOS prepared by experiments/prepare.py amos (ct/, mr/, ct_x2/, ct_x3/)")
    p.add_argument("--mmwhs", help="MMWHS prepared by experiments/prepare.py mmwhs (ct/, mr/, mr_all/, cv0/, cv1/)")
    p.add_argument("--out", required=True, help="campaign folder: runs, tables, manifest.json")
    p.add_argument("--clip_weights",
                   help="CLIP ViT-B/32 weights (ViT-B-32.pt); without them the official file is downloaded once")
    p.add_argument("--embedding", action="append", default=[], metavar="NAME=PATH",
                   help=f"a table file for {' and '.join(USER_TABLES)} (Table 1); runs without one are skipped")
    p.add_argument("--backbone", choices=list(BACKBONES), help="only the runs with this backbone")
    p.add_argument("--device", help="train.py/infer.py --device (default: auto)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"],
                   help="train.py/infer.py --amp (default: auto, bf16 on a recent GPU; the reference ran fp32: none)")
    p.add_argument("--folds", type=int, default=0, metavar="N",
                   help="train each run as N cross-validation folds (train.py --fold K --num_folds N) and evaluate "
                   "the ensemble of the N fold models; collect.py adds a table of fold means and mean +- std")
    p.add_argument("--smoke", action="store_true",
                   help="bundled sample, tiny settings, random tables: checks the recipes run")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Runner flags, and the train.py flags after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    names = list(TABLES) if args.tables == ["all"] else args.tables
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise SystemExit(f"unknown table(s) {unknown}: choose from {list(TABLES)} or all")
    args.tables = names
    if args.folds == 1 or args.folds < 0:
        raise SystemExit(f"--folds {args.folds}: give 2 or more folds, or 0 for one run on all training scans")
    if args.folds and args.smoke:
        raise SystemExit("--folds with --smoke: the bundled sample holds one scan per modality, too few for folds")
    return args, extra


class Planner:
    """Turns recipes into steps, giving identical commands one step (one training, one evaluation)."""

    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args, self.extra = args, extra
        self.out = Path(args.out)
        self.embeddings = dict(item.split("=", 1) for item in args.embedding)
        self.plan = Plan()
        self.trained: dict[tuple, Path] = {}  # train argv without --out -> run folder
        self.evaluated: dict[tuple, Path] = {}  # (run folder, infer argv without --output) -> eval folder
        self.tables: set[Path] = set()

    def data_root(self, dataset: str) -> Path:
        if self.args.smoke:
            return SAMPLE
        root = getattr(self.args, dataset)
        if not root:
            raise SystemExit(f"this table needs --{dataset} DIR (prepare it with experiments/prepare.py {dataset})")
        return Path(root)

    def folder(self, dataset: str, modality: str, folder: str) -> Path:
        return self.data_root(dataset) / (SAMPLE_FOLDERS[modality] if self.args.smoke else folder)

    def text_flags(self, run: Run) -> list[str] | None:
        """train.py flags for the run's embedding (None: a user table that was not given)."""
        classes = DATASETS[run.dataset][0]
        if run.text in ("none", "onehot"):
            return ["--text", run.text]
        if run.text in USER_TABLES and not self.args.smoke:
            return ["--text", self.embeddings[run.text]] if run.text in self.embeddings else None
        path = self.out / "tables" / f"{classes}_{run.text.replace('-', '_')}.pt"
        if path not in self.tables:
            self.tables.add(path)
            template = run.text.split("-")[1] if run.text.startswith("clip-") else None
            if self.args.smoke:
                dim = USER_TABLE_DIMS.get(run.text, 512)
                self.plan.steps.append(Step("table", [], path, random_table=(classes, template, dim)))
            else:
                weights = ["--clip_weights", self.args.clip_weights] if self.args.clip_weights else ["--download"]
                argv = [*weights, "--classes", classes, "--template", template, "--modalities", "CT", "MR",
                        "--out", str(path)]
                self.plan.steps.append(Step("table", argv, path))
        return ["--text", str(path)]

    def device_flags(self) -> list[str]:
        """--device and --amp, the same for training and evaluation."""
        return [f"--{name}={value}" for name in ("device", "amp") if (value := getattr(self.args, name))]

    def train_step(self, run: Run) -> Path | None:
        """The run's folder, adding its training step unless an identical one is planned."""
        text = self.text_flags(run)
        if text is None:
            self.plan.skipped.append(f"{run.row}: pass --embedding {run.text}=PATH to run it")
            return None
        classes, label_map, _ = DATASETS[run.dataset]
        if self.args.smoke:
            label_map = SMOKE_LABEL_MAPS.get(run.dataset, label_map)
        argv = []
        for modality, folder in run.training_folders().items():
            argv += [f"--{modality.lower()}_dir", str(self.folder(run.dataset, modality, folder))]
        argv += ["--classes", classes, "--label_map", label_map, "--backbone", run.backbone, *text, "--mode", run.mode]
        argv += REFERENCE_AUGMENTATION
        if self.args.smoke:
            argv += SMOKE_WIDTH[run.backbone] + SMOKE_TRAIN
        argv += self.device_flags()
        argv += ["--cache_dir", str(self.out / "cache"), *self.extra]
        key = tuple(argv)
        if key not in self.trained:
            run_dir = self.out / run.dataset / run.name
            self.trained[key] = run_dir
            if not self.args.folds:
                self.plan.steps.append(Step("train", [*argv, "--out", str(run_dir)], run_dir))
            for fold in range(self.args.folds):
                fold_argv = [*argv, "--out", str(run_dir), "--fold", str(fold), "--num_folds", str(self.args.folds)]
                self.plan.steps.append(Step("train", fold_argv, run_dir / f"fold_{fold}"))
        return self.trained[key]

    def checkpoints(self, run_dir: Path) -> list[str]:
        """The checkpoints a run is evaluated with: its last.pt, or each fold's (their ensemble)."""
        folders = [run_dir / f"fold_{fold}" for fold in range(self.args.folds)] or [run_dir]
        return [str(folder / "last.pt") for folder in folders]

    def eval_step(self, run: Run, run_dir: Path, ev: Eval) -> Path:
        """The evaluation's folder, adding its step unless an identical one is planned."""
        folder = ev.folder or DATASETS[run.dataset][2][ev.modality]
        test = self.folder(run.dataset, ev.modality, folder)
        images, labels = ("imagesTr", "labelsTr") if self.args.smoke else ("imagesTs", "labelsTs")
        argv = ["--checkpoint", *self.checkpoints(run_dir), "--modality", ev.modality,
                "--input", str(test / images), "--labels", str(test / labels)]
        if ev.prompt:
            argv += ["--prompt_modality", ev.prompt]
        argv += self.device_flags()
        key = (run_dir, tuple(argv))
        if key not in self.evaluated:
            name = "-".join([ev.modality, *([f"prompt{ev.prompt}"] if ev.prompt else []),
                             *([folder.replace("/", "_")] if ev.folder else [])])
            eval_dir = run_dir / "eval" / name
            self.evaluated[key] = eval_dir
            self.plan.steps.append(Step("infer", [*argv, "--output", str(eval_dir)], eval_dir))
        return self.evaluated[key]

    def add_table(self, name: str) -> None:
        table = TABLES[name]
        entries, folds = [], []
        for run in table.runs:
            if self.args.backbone and run.backbone != self.args.backbone:
                continue
            run_dir = self.train_step(run)
            if run_dir is None:
                continue
            paper = dict(run.paper)
            if self.args.folds:
                folds.append({"row": run.row, "folds": [str(Path(c).parent) for c in self.checkpoints(run_dir)]})
            for ev in run.evals:
                eval_dir = self.eval_step(run, run_dir, ev)
                entries.append({"row": run.row, "column": ev.column, "eval_dir": str(eval_dir),
                                "paper": paper.get(ev.column)})
        self.plan.manifest[name] = {"title": table.title, "kind": table.kind, "paper": table.paper,
                                    "smoke": self.args.smoke, "entries": entries, "folds": folds}


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    """All steps of ``args.tables`` in run order (tables first, then each training and its evaluations)."""
    planner = Planner(args, extra)
    for name in args.tables:
        planner.add_table(name)
    plan = planner.plan
    order = {"table": 0, "train": 1, "infer": 1}
    plan.steps.sort(key=lambda s: order[s.kind])  # stable: a training stays before its evaluations
    return plan


def missing_inputs(plan: Plan) -> list[str]:
    """Dataset folders, CLIP weights and user embedding tables the steps read that do not exist (all
    reported at once, before any work; tables that an earlier step builds are not expected yet)."""
    built = {str(step.out) for step in plan.steps if step.kind == "table"}
    problems = []
    for step in plan.steps:
        flags = {"train": ("--ct_dir", "--mr_dir"), "infer": ("--input", "--labels")}.get(step.kind, ())
        for flag in flags:
            if flag in step.argv:
                path = Path(step.argv[step.argv.index(flag) + 1])
                if not path.is_dir():
                    problems.append(f"{flag} {path}: no such folder (see experiments/prepare.py)")
        for flag in ("--clip_weights", "--text"):
            if flag in step.argv:
                value = step.argv[step.argv.index(flag) + 1]
                if value not in ("clip", "onehot", "none") and value not in built and not Path(value).is_file():
                    problems.append(f"{flag} {value}: no such file")
    return sorted(set(problems))


def random_table(path: Path, classes: str, template: str | None, dim: int) -> None:
    """A table of CLIP's shape from a randomly initialised, narrow CLIP text tower (smoke runs only)."""
    import torch

    from mulmodseg.text import CLIPTextEncoder, EmbeddingTable, build_embedding_table
    from mulmodseg.text.clip import TextConfig
    from mulmodseg.text.prompts import resolve_classes

    torch.manual_seed(0)
    if template is not None:
        encoder = CLIPTextEncoder(TextConfig(width=64, layers=1, heads=1, embed_dim=dim), name="random-clip")
        table = build_embedding_table(encoder, classes, ["CT", "MR"], template)
    else:
        names = resolve_classes(classes)
        table = EmbeddingTable(("CT", "MR"), names, torch.randn(2, len(names), dim), None, "random")
    table.save(path)


def execute(step: Step) -> None:
    """Run one step in this process; a finished step is skipped, a stopped training resumed."""
    from mulmodseg.checkpoint import load_checkpoint
    from mulmodseg.cli import predict as predict_cli
    from mulmodseg.cli import text as text_cli
    from mulmodseg.cli import train as train_cli

    argv = list(step.argv)
    if step.kind == "table":
        if step.out.is_file():
            return
        step.out.parent.mkdir(parents=True, exist_ok=True)  # the text CLI writes only into existing folders
        if step.random_table is not None:
            return random_table(step.out, *step.random_table)
        rc = text_cli.main(argv)
    elif step.kind == "train":
        last = step.out / "last.pt"
        # A run stopped after its last epoch was saved but before `done` was written is finished too.
        if (step.out / "done").is_file() or (
                last.is_file() and load_checkpoint(last)["epoch"] >= train_cli.build_parser().parse_args(argv).epochs):
            (step.out / "done").touch()
            return
        rc = train_cli.main(argv + (["--resume"] if last.is_file() else []))
        if rc == 0:
            (step.out / "done").touch()
    else:
        if (step.out / "metrics.csv").is_file():
            return
        rc = predict_cli.main(argv + (["--overwrite"] if step.out.exists() else []))
    if rc != 0:
        raise SystemExit(f"failed (exit status {rc}): {step.command()}")


def write_manifest(out: Path, manifest: dict) -> None:
    """Merge this invocation's tables into OUT/manifest.json, keeping the cells of earlier invocations
    (e.g. a table run once per ``--backbone``) that this one does not evaluate again."""
    path = out / "manifest.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}

    # A table's earlier items (entries, folds) that this invocation does not redo, then its own.
    def merge(name: str, part: str, key: str) -> list[dict]:
        new = {str(e[key]) for e in manifest[name][part]}
        return [e for e in merged.get(name, {}).get(part, []) if str(e[key]) not in new] + manifest[name][part]

    for name, table in manifest.items():
        merged[name] = {**table, "entries": merge(name, "entries", "eval_dir"), "folds": merge(name, "folds", "folds")}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    plan = make_plan(args, extra)
    for note in plan.skipped:
        print(f"skipped {note}", file=sys.stderr)
    if args.dry_run:
        print("\n".join(step.command() for step in plan.steps))
        return 0
    problems = missing_inputs(plan)
    if problems:
        print("error: missing data\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    write_manifest(Path(args.out), plan.manifest)
    for i, step in enumerate(plan.steps, 1):
        print(f"[{i}/{len(plan.steps)}] {step.command()}", file=sys.stderr, flush=True)
        execute(step)
    print(f"done; tables: python experiments/collect.py {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
