"""Head settings compared on one backbone, for choosing settings on training and validation images only.

    python benchmarks/scripts/head_variants.py --data runs/monuseg-dev --backbone runs/monuseg/backbone --labels 10 \
        --variants '{"finest": {}, "full resolution": {"head.full_resolution": true}, "1200 steps": {"steps": 1200}}'

<data> holds train/ (the labeled pool) and test/ (here: the held-out validation images, never the test split). Each
variant is a set of `--set` overrides (plus "steps", optimizer steps, default 400) and trains TextDiff on the same
seeded labeled subset as `textdiff-bench benchmark`; variants that read the backbone the same way share its cached features.
One JSON line per variant: Dice and IoU, the validation Dice per epoch and the training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from textdiff.model.backbone import make_extractor
from textdiff_bench.benchmark import _pool, _subset, epochs_for
from textdiff.config import TextDiffConfig, with_overrides
from textdiff.data.studies import read_studies
from textdiff.model.features import FeatureCache
from textdiff.evaluation import score_masks, segment_items
from textdiff.model.segmenter import TextDiffModel
from textdiff.model.text import TextEncoder
from textdiff.training.options.intensity import training_window_count
from textdiff.training.runs import split_train_val
from textdiff.training.train import train_head


def run_variant(cfg: TextDiffConfig, cache: FeatureCache, text: TextEncoder, data: Path, labels: int, seed: int,
                steps: int) -> dict:
    torch.manual_seed(seed)
    model = TextDiffModel(cfg, cache.extractor, text)
    pool = [model.load(c) for c in _pool(data)]  # as `textdiff-bench benchmark` draws labels
    test = [model.load(c) for c in read_studies(data / "test")]
    held_out = dataclasses.replace(cfg.train, min_val_images=1)  # as measured: a fifth held out, from 4 labels on
    train, val = split_train_val(_subset(pool, labels, seed), held_out, seed)
    epochs = epochs_for(steps, training_window_count(train, model.image_size, cfg.train), cfg.train.batch_size)
    start = time.perf_counter()
    result = train_head(model, train, val, dataclasses.replace(cfg.train, epochs=epochs, seed=seed), cache=cache,
                        progress=False)
    seconds = time.perf_counter() - start
    scores = score_masks(segment_items(model, test, cache=cache), test, model.cfg.head.num_classes)["mean"]
    return {"labels": labels, "seed": seed, "steps": steps, **scores, "best_epoch": result.best_epoch,
            "val_dice": [h["val_dice"] and round(h["val_dice"], 3) for h in result.history], "train_seconds": round(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--variants", required=True, help="JSON: name -> {setting: value, ..., 'steps': N}")
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = with_overrides(TextDiffConfig(), {"backbone.pretrained": args.backbone})
    text, caches = TextEncoder(base.text), {}
    for name, overrides in json.loads(args.variants).items():
        steps = overrides.pop("steps", 400)
        cfg = with_overrides(base, overrides)
        key = json.dumps([cfg.backbone.feature_layers, cfg.backbone.timesteps, cfg.backbone.patch_scale])
        caches.setdefault(key, FeatureCache(make_extractor(cfg.backbone)))
        row = run_variant(cfg, caches[key], text, args.data, args.labels, args.seed, steps)
        print(json.dumps({"variant": name, **row}), flush=True)


if __name__ == "__main__":
    main()
