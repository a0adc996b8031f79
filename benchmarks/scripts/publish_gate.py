"""How often the publish gate decides as a held-out test split would, with few labels, and what it costs.

    python benchmarks/scripts/publish_gate.py --data runs/mni256-wm --backbone runs/mni256/bb-10 --labels 5 \
        --seeds 0 1 2 3 4 --out runs/gate/mni-wm.json

For each seed the model in service trains on `--labels` - 1 images drawn (seeded) from <data>/train; each candidate
recipe (`--variants`: name -> --set overrides) then trains from its head, as the app's retrain does, on those and one
more label. Three decisions per candidate, each "publish when its Dice is at least the service's": on the labeled
images, which both may have learned (the gate when nothing is known of what the model in service saw); on the new
label, left out of one run of the candidate's recipe (`textdiff.training.comparison`, the app's gate); and on
<data>/test (what the gate stands in for). Prints a table and writes JSON: decisions, Dice values, seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from textdiff.config import with_overrides
from textdiff.evaluation import dice_on_cases
from textdiff.model.segmenter import read_head_weights
from textdiff.training.comparison import left_out_dice
from textdiff.training.runs import train_on_cases
from textdiff_bench.seeded import base_config, draw, run_folder, seeded_parser, write_rows

DEFAULT_VARIANTS = {"default": {}, "10 steps": {"train.steps": 10, "train.val_every": 10},
                    "learning rate x30": {"train.lr": 0.03}}


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - start


def one_seed(args, seed: int, variants: dict, out: Path) -> list[dict]:
    drawn, test = draw(args.data, args.labels, seed)
    base = base_config(args, seed)
    cache = out / "feature-cache"
    service, _ = train_on_cases(drawn[:-1], base, out / f"service-{seed}.pt", progress=False, cache_folder=cache)
    head = read_head_weights(out / f"service-{seed}.pt")
    service_dice = {"labeled": dice_on_cases(service, drawn), "new": dice_on_cases(service, drawn[-1:]),
                    "test": dice_on_cases(service, test)}
    rows = []
    for name, overrides in variants.items():
        cfg = with_overrides(base, overrides)
        (candidate, _), seconds = timed(train_on_cases, drawn, cfg, out / f"candidate-{seed}.pt", progress=False,
                                        cache_folder=cache, initial_head=head)
        left_out, extra = timed(left_out_dice, cfg, drawn, drawn[-1:], "cpu", cache, head)
        left_out = left_out[drawn[-1].id]
        dice = {"labeled": dice_on_cases(candidate, drawn), "left-out": left_out, "test": dice_on_cases(candidate, test)}
        rows.append({"seed": seed, "variant": name, "candidate": dice, "service": service_dice,
                     "publish": {"labeled": dice["labeled"] >= service_dice["labeled"],
                                 "left-out": left_out >= service_dice["new"],
                                 "test": dice["test"] >= service_dice["test"]},
                     "train_seconds": round(seconds, 1), "left_out_seconds": round(extra, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = seeded_parser(__doc__.split("\n")[0], "labels of the candidate (the service has one fewer)")
    parser.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS, help="JSON: name -> --set overrides")
    args = parser.parse_args()
    folder = run_folder(args)
    rows = [row for seed in args.seeds for row in one_seed(args, seed, args.variants, folder)]
    print(f"{'':24}agrees with the test split   extra seconds (left-out run)")
    for basis in ("labeled", "left-out"):
        agree = sum(row["publish"][basis] == row["publish"]["test"] for row in rows)
        print(f"judged on {basis:14} {agree}/{len(rows)}")
    print("left-out run: " + ", ".join(f"{row['left_out_seconds']:.0f} s" for row in rows))
    write_rows(args, rows)


if __name__ == "__main__":
    main()
