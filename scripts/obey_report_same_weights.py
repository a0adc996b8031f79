"""What `head.obey_report` does to the same weights: train plain TextDiff once per seed as `textdiff benchmark` does
(10 labels plus the pool's healthy images, text dropout 0.5, 400 steps) and score its test masks twice, as the model
draws them and through `obey_reports`. A benchmark row with the rule on is a separate training, whose chosen epoch
can differ; this isolates the rule.

    OMP_NUM_THREADS=1 python scripts/obey_report_same_weights.py --data sample-data \
        --backbone apps/textdiff/demo/backbones/sample-data --seeds 0 1 2 --out runs/obey-same-weights.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from textdiff.backbone import make_extractor
from textdiff.benchmark import _pool, _subset, epochs_for
from textdiff.config import TextDiffConfig
from textdiff.data import load_case, read_studies
from textdiff.features import FeatureCache
from textdiff.headroom import area_oracle
from textdiff.inference import score_masks, to_original_size
from textdiff.model import TextDiffModel
from textdiff.report_supervision import obey_reports
from textdiff.text import TextEncoder
from textdiff.train import healthy_cases, predict_logits, split_train_val, train_head, with_empty_mask


def _scores(logits: torch.Tensor, test: list[dict]) -> dict:
    masks = [to_original_size(lg, item["original_shape"]) for lg, item in zip(logits, test)]
    oracle = area_oracle(masks, test, 2)
    return {"dice": score_masks(masks, test, 2)["mean"]["dice"], "missed": oracle["missed_areas"],
            "false": oracle["false_areas"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = TextDiffConfig.from_dict({"backbone": {"pretrained": args.backbone},
                                    "train": {"text_dropout": 0.5, "healthy_label": "normal"}})
    cache, text = FeatureCache(make_extractor(cfg.backbone)), TextEncoder(cfg.text)
    size = TextDiffModel(cfg, cache.extractor, text).image_size
    cases = _pool(args.data)
    pool = [load_case(c, size, 1, 2) for c in cases]
    healthy = {c.id for c in healthy_cases([dataclasses.replace(c, label=None) for c in cases], "normal")}
    test = [load_case(c, size, 1, 2) for c in read_studies(args.data / "test")]
    rows = []
    for seed in args.seeds:
        labeled = _subset(pool, args.labels, seed)
        train, val = split_train_val(labeled, cfg.train.val_fraction, seed)
        drawn = {item["id"] for item in labeled}
        train += [with_empty_mask(item) for item in pool if item["id"] in healthy and item["id"] not in drawn]
        torch.manual_seed(seed)
        model = TextDiffModel(cfg, cache.extractor, text)
        epochs = epochs_for(400, len(train), cfg.train.batch_size)
        train_head(model, train, val, dataclasses.replace(cfg.train, epochs=epochs, seed=seed), cache=cache,
                   progress=False)
        logits = predict_logits(model, test, cache)
        rows.append({"seed": seed, "raw": _scores(logits, test),
                     "obey": _scores(obey_reports(logits, [item["report"] for item in test]), test)})
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    gains = [row["obey"]["dice"] - row["raw"]["dice"] for row in rows]
    print(f"obey_report - as drawn: {statistics.mean(gains):+.4f} ± {statistics.pstdev(gains):.4f} over {len(gains)} "
          f"seeds, better in {sum(g > 0 for g in gains)}")


if __name__ == "__main__":
    main()
