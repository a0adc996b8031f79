"""Folds of a labeled pool, for choosing settings on training images alone when a validation split is small.

    python benchmarks/scripts/pool_folds.py runs/monuseg/train --folds 5 --out runs/monuseg-cv

Fold F is `OUT/fold-F/{train,test}`: the pool's images in name order, every K-th from the F-th scored (`test`), the
others the fold's pool (`train`), each a studies folder of links to the pool's images and final masks with its rows
of `reports.csv`. `textdiff-bench benchmark --data OUT/fold-F` then trains on a fold's pool and scores the rest.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

MASKS = Path("labels") / "final"


def write_split(pool: Path, rows: list[dict], out: Path) -> None:
    """A studies folder at `out` of links to the images (and final masks) of `rows`, and their `reports.csv`."""
    (out / MASKS).mkdir(parents=True, exist_ok=True)
    for row in rows:
        for where in (Path(row["image"]), MASKS / row["image"]):
            if (pool / where).exists() and not (out / where).exists():
                (out / where).symlink_to((pool / where).resolve())
    with open(out / "reports.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pool", type=Path, help="studies folder with reports.csv and labels/final")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with open(args.pool / "reports.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["image"])
    if not 2 <= args.folds <= len(rows):
        parser.error(f"--folds must be 2 to the pool's {len(rows)} images")
    for fold in range(args.folds):
        scored = rows[fold::args.folds]
        write_split(args.pool, [row for row in rows if row not in scored], args.out / f"fold-{fold}" / "train")
        write_split(args.pool, scored, args.out / f"fold-{fold}" / "test")
        print(f"fold-{fold}: {len(rows) - len(scored)} pool images, {len(scored)} scored")


if __name__ == "__main__":
    main()
