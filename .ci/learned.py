"""CI's accuracy guard: ``python .ci/learned.py METRICS.csv MIN [METRICS.csv MIN ...]``.

Each infer.py ``metrics.csv`` must have, in every case, a mean Dice over spleen, both kidneys, liver and
stomach of at least MIN; prints the figures and exits 1 naming each file that falls short.
"""
import csv
import sys

ORGANS = ("spleen", "right kidney", "left kidney", "liver", "stomach")


def organ_means(path: str) -> list[float]:
    """The mean Dice over ORGANS of every case (row) of an infer.py metrics.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        return [sum(float(row[name]) for name in ORGANS) / len(ORGANS) for row in csv.DictReader(f)]


def main(argv: list[str]) -> int:
    failed = []
    for path, minimum in zip(argv[::2], map(float, argv[1::2])):
        means = organ_means(path)
        print(f"{path}: mean Dice of {', '.join(ORGANS)}: {', '.join(f'{m:.3f}' for m in means)} (at least {minimum})")
        if not means or min(means) < minimum:
            failed.append(path)
    if failed:
        print(f"the trained model did not learn enough: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
