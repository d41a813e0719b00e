"""Gather the evaluations of a campaign into the paper's tables: ``python experiments/collect.py runs/paper``.

Reads ``OUT/manifest.json`` (written by ``experiments/run.py``), which says which evaluation folder
fills which (row, column) cell of which table, and prints Markdown: per table and test modality, the
per-organ Dice of every row (``mulmodseg.metrics.markdown_table``), then our average beside the paper's.
Evaluations that share a cell (Table 4's two cross-validation folds) are pooled case by case, so a
class's mean is over every test case where it is present. Table 8 reads the cost line that infer.py
writes into each ``summary.md``. Cells whose evaluation has not run yet read ``not run``.

A campaign run with ``run.py --folds N`` also gets a cross-validation table per table: each fold's mean
validation Dice per modality (``RUN/fold_K/validation/MODALITY/metrics.csv``, written by train.py) and,
per row, the mean +- std over the folds (std with n - 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

from mulmodseg.metrics import ABSENT, markdown_table, summarise

NOT_RUN = "not run"
COST = re.compile(r"parameters ([\d,]+); ([\d.]+) GFLOPs per (\S+) window; ([\d.]+) s per case on (\S+)")


def read_metrics_csv(path: str | Path) -> tuple[list[str], list[dict]]:
    """infer.py's ``metrics.csv`` -> (foreground class names, rows ``{"case", "modality", "dice": (C,)}``),
    an absent class (an empty cell; ``absent`` in files written before NSD and HD95 were added) read
    back as NaN."""
    with open(path, newline="", encoding="utf-8") as f:
        header, *lines = list(csv.reader(f))
    end = header.index("mean")  # case, modality, <Dice per class>, mean, then the NSD and HD95 columns
    names = header[2:end]
    rows = [
        {"case": line[0], "modality": line[1],
         "dice": np.array([np.nan if v in ("", ABSENT) else float(v) for v in line[2:end]], dtype=np.float64)}
        for line in lines
    ]
    return names, rows


def read_cost(summary_md: str | Path) -> dict | None:
    """The cost line of infer.py's ``summary.md`` -> {"params", "gflops", "window", "seconds", "device"}."""
    match = COST.search(Path(summary_md).read_text()) if Path(summary_md).is_file() else None
    if match is None:
        return None
    params, gflops, window, seconds, device = match.groups()
    return {"params": int(params.replace(",", "")), "gflops": float(gflops), "window": window,
            "seconds": float(seconds), "device": device}


def cells(entries: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(row, column) -> the manifest entries filling it, in manifest order."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:
        grouped.setdefault((entry["row"], entry["column"]), []).append(entry)
    return grouped


def _number(value: float | None) -> str:
    return NOT_RUN if value is None else ("n/a" if np.isnan(value) else f"{value:.2f}")


def dice_table(table: dict) -> str:
    """Markdown for a Dice table: per-organ tables per column, then ours beside the paper's averages."""
    grouped = cells(table["entries"])
    rows = list(dict.fromkeys(r for r, _ in grouped))
    columns = list(dict.fromkeys(c for _, c in grouped))
    ours: dict[tuple[str, str], float] = {}
    parts = []
    for column in columns:
        summaries, names = {}, None
        for row in rows:
            found = [Path(e["eval_dir"]) / "metrics.csv" for e in grouped.get((row, column), [])]
            found = [p for p in found if p.is_file()]
            if not found:
                continue
            pooled = []
            for path in found:
                names, case_rows = read_metrics_csv(path)
                pooled += case_rows
            summaries[row] = summarise(pooled)
            ours[(row, column)] = 100.0 * summaries[row]["mean"]
        if summaries:
            parts.append(f"Test set {column}, Dice % per organ:\n\n{markdown_table(summaries, names)}")
    header = ["Setting"] + [f"{c} {who}" for c in columns for who in ("ours", "paper")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        values = []
        for column in columns:
            entries = grouped.get((row, column))
            paper = entries[0]["paper"] if entries else None
            values += [_number(ours.get((row, column))) if entries else "", "" if paper is None else f"{paper:.2f}"]
        lines.append("| " + " | ".join([row, *values]) + " |")
    parts.append("Average Dice %, ours beside the paper's:\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def fold_means(fold_dir: str | Path) -> dict[str, float]:
    """{modality: mean validation Dice %} of one fold's ``validation/MODALITY/metrics.csv`` files."""
    found = sorted(Path(fold_dir, "validation").glob("*/metrics.csv"))
    return {path.parent.name: 100.0 * summarise(read_metrics_csv(path)[1])["mean"] for path in found}


def cv_table(table: dict) -> str:
    """Markdown: per row of ``table["folds"]``, each fold's mean validation Dice % per modality, then the
    mean +- std over the folds (``not run`` where a fold has not validated yet)."""
    rows = [(item["row"], [fold_means(d) for d in item["folds"]]) for item in table["folds"]]
    modalities = sorted({m for _, folds in rows for means in folds for m in means})
    lines = ["| Setting | fold | " + " | ".join(modalities) + " |", "|---|---|" + "---:|" * len(modalities)]
    for row, folds in rows:
        for fold, means in enumerate(folds):
            lines.append(f"| {row} | {fold} | " + " | ".join(_number(means.get(m)) for m in modalities) + " |")
        spread = []
        for m in modalities:
            values = [means[m] for means in folds if m in means]
            spread.append(f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) == len(folds) > 1
                          else NOT_RUN)
        lines.append(f"| {row} | mean ± std | " + " | ".join(spread) + " |")
    return ("Cross-validation, mean validation Dice % per fold (on the training grid):\n\n"
            + "\n".join(lines) + "\n")


def cost_table(table: dict) -> str:
    """Markdown for Table 8 from each row's summary.md cost line, beside the paper's A100 numbers."""
    header = ["Setting", "parameters (M)", "GFLOPs per window", "window", "s per case", "device",
              "paper parameters (M)", "paper s per case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 4 + ["---"] + ["---:"] * 2) + "|"]
    for (row, _), entries in cells(table["entries"]).items():
        cost = read_cost(Path(entries[0]["eval_dir"]) / "summary.md")
        paper = table["paper"].get(row, {})
        ours = ([f"{cost['params'] / 1e6:.2f}", f"{cost['gflops']:.1f}", cost["window"], f"{cost['seconds']:.2f}",
                 cost["device"]] if cost else [NOT_RUN] + [""] * 4)
        theirs = [f"{paper[k]:.2f}" if k in paper else "" for k in ("params_m", "seconds")]
        lines.append("| " + " | ".join([row, *ours, *theirs]) + " |")
    return "\n".join(lines) + "\n"


def collect(out_dir: str | Path, tables: list[str] | None = None) -> str:
    """Markdown for ``tables`` (default: every table in the manifest) of the campaign in ``out_dir``."""
    manifest_path = Path(out_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"{manifest_path}: not found; run experiments/run.py with --out {out_dir} first")
    manifest = json.loads(manifest_path.read_text())
    unknown = [t for t in tables or [] if t not in manifest]
    if unknown:
        raise SystemExit(f"{manifest_path} has no {unknown}; it has {list(manifest)}")
    parts = []
    for name in tables or list(manifest):
        table = manifest[name]
        title = f"## {table['title']}"
        if table.get("smoke"):
            title += "\n\n(smoke run: bundled sample, tiny settings, random text tables; the numbers mean nothing)"
        body = cost_table(table) if table["kind"] == "cost" else dice_table(table)
        if table.get("folds"):
            body += "\n" + cv_table(table)
        parts.append(f"{title}\n\n{body}")
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gather a campaign's metrics.csv files into the paper's tables (Markdown).")
    p.add_argument("campaign", help="the --out folder of experiments/run.py")
    p.add_argument("--tables", nargs="+", help="only these tables (default: all in the manifest)")
    p.add_argument("--out", help="write the Markdown here instead of printing it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    text = collect(args.campaign, args.tables)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
