"""A run folder's record: its epoch log (``log.jsonl``), the loss curves drawn from it, and how to go on after a
run stopped."""

from __future__ import annotations

import json
from pathlib import Path

from mulmodseg.files import atomic_write, raise_if_no_space
from mulmodseg.viz import plot_curves


def run_leftovers(out: Path) -> list[str]:
    """The names of the epoch files in the run folder ``out`` (log.jsonl, best.pt, epoch_N.pt): left
    by a run that stopped before its first last.pt, they keep a new run from mixing with them."""
    names = sorted(p.name for p in (out / "log.jsonl", out / "best.pt") if p.is_file())
    return names + sorted(p.name for p in out.glob("epoch_*.pt"))


def how_to_go_on(out: Path, epoch: int | None = None) -> str:
    """How to continue the run in ``out`` after it stopped (Ctrl-C, a full disk): resume from its last.pt
    (of ``epoch``, when known), or start again once the files of its first epochs are deleted."""
    last, leftovers = out / "last.pt", run_leftovers(out)
    if last.is_file():
        of_epoch = "" if epoch is None else f" (epoch {epoch})"
        return f"{last}{of_epoch} holds the last saved epoch: run the same command with --resume to continue"
    if leftovers:
        return (f"no last.pt was written yet; delete {', '.join(leftovers)} in {out} (or choose another --out) to "
                "start again")
    return "no checkpoint was written yet"


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


def append_record(path: Path, record: dict) -> None:
    """One epoch's record as a line of ``log.jsonl`` (a line cut short by a full disk is dropped on resume,
    ``trim_log``)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as error:
        raise_if_no_space(error, path)
        raise


def trim_log(path: Path, epoch: int) -> None:
    """Drop the records of ``log.jsonl`` after ``epoch`` (epochs run after the checkpoint a run resumes
    from are run again, and would otherwise be logged twice), and any torn line."""
    if not path.is_file():
        return
    kept = "".join(json.dumps(record) + "\n" for record in read_log(path) if record["epoch"] <= epoch)
    atomic_write(path, lambda tmp: tmp.write_text(kept))


def write_curves(log_path: str | Path, png_path: str | Path) -> None:
    """Loss curves per modality and validation Dice from a run's ``log.jsonl``, as a PNG."""
    series: dict[str, list[tuple[float, float]]] = {}
    for record in read_log(log_path):
        for key, value in record.items():
            if key.endswith(("_loss", "/val_dice")):
                series.setdefault(key, []).append((record["epoch"], value))
    if series:
        atomic_write(png_path, lambda tmp: plot_curves(series, tmp))
