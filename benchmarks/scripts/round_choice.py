"""Which round a run with nothing held out should keep: the best on its training images, or the last.

    python benchmarks/scripts/round_choice.py --data runs/mni256-wm --backbone runs/mni256/bb-10 --labels 5 \
        --seeds 0 1 2 --out runs/gate/rounds-mni-wm.json

For each seed, `--labels` images drawn (seeded) from <data>/train train the head twice from the same start, once per
`train.checkpoint` choice (`--choices`), with `--set` overrides for both; each model is scored on <data>/test. With
fewer than 8 labels nothing is held out, so "best" chooses the round on the images the run trained on. Prints a
table (the round each kept, test Dice, seconds) and writes JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from textdiff.config import with_overrides
from textdiff.evaluation import dice_on_cases
from textdiff.training.runs import train_on_cases
from textdiff_bench.seeded import base_config, draw, run_folder, seeded_parser, write_rows


def one_seed(args, seed: int, folder: Path) -> list[dict]:
    drawn, test = draw(args.data, args.labels, seed)
    base = base_config(args, seed)
    rows = []
    for choice in args.choices:
        cfg = with_overrides(base, {"train.checkpoint": choice})
        start = time.perf_counter()
        model, result = train_on_cases(drawn, cfg, folder / f"{choice}-{seed}.pt", progress=False,
                                       cache_folder=folder / "feature-cache")
        seconds = time.perf_counter() - start
        rows.append({"seed": seed, "checkpoint": choice, "kept": result.kept, "round": result.best_epoch,
                     "rounds": len(result.history), "test_dice": dice_on_cases(model, test),
                     "train_seconds": round(seconds, 1), "labeled": [c.id for c in drawn]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = seeded_parser(__doc__.split("\n")[0])
    parser.add_argument("--choices", nargs="+", default=["best", "last"], help="train.checkpoint values to compare")
    args = parser.parse_args()
    folder = run_folder(args)
    rows = [row for seed in args.seeds for row in one_seed(args, seed, folder)]
    print(f"{'seed':>4}  " + "  ".join(f"{c + ': round, test Dice':>26}" for c in args.choices))
    for seed in args.seeds:
        mine = {row["checkpoint"]: row for row in rows if row["seed"] == seed}
        cells = [f"{mine[c]['round']:>5}/{mine[c]['rounds']}, {mine[c]['test_dice']:.4f}" for c in args.choices]
        print(f"{seed:>4}  " + "  ".join(cell.rjust(26) for cell in cells))
    write_rows(args, rows)


if __name__ == "__main__":
    main()
