"""What obeying the report does to the same weights: train plain TextDiff once per seed as `textdiff-bench benchmark` does
(10 labels plus the pool's healthy images, text dropout 0.5, 400 steps) and score its test masks as the model draws
them, through `obey_reports` (`head.obey_report`: the report's sides), and through two stricter rules that
were measured and not adopted, which also read the report's count of areas or its zones. A benchmark row with a rule on
is a separate training, whose chosen epoch can differ; this isolates the rule.

    OMP_NUM_THREADS=1 python benchmarks/scripts/obey_report_same_weights.py --data sample-data \
        --backbone apps/textdiff/demo/backbones/sample-data --seeds 0 1 2 --out runs/obey-same-weights.json

- sides+count: where the mask has fewer areas than the report counts, add the most likely area in a named lung
  (clear of what is drawn) until it has that many; where it has more, erase the least likely ones.
- sides+zones: in each zone the report names (a third of the lung's height) where nothing is drawn, draw the most
  likely area there. Where a lung ends is estimated from the image: its dark air inside the body (Otsu threshold).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

from textdiff.model.backbone import make_extractor
from textdiff_bench.benchmark import _pool, _subset, epochs_for
from textdiff.config import TextDiffConfig
from textdiff.data.studies import load_case, read_studies
from textdiff.model.features import FeatureCache
from textdiff_bench.headroom import area_oracle
from textdiff.evaluation import label_map, score_masks
from textdiff.model.segmenter import TextDiffModel
from textdiff.model.report_supervision import SIDES, named_sides, obey_reports, side_region
from textdiff.model.text import TextEncoder
from textdiff.model.segmenter import predict_logits
from textdiff.training.options.extra_labels import healthy_cases, with_empty_mask
from textdiff.training.runs import split_train_val
from textdiff.training.train import train_head

ZONES = ("upper", "middle", "lower")
_COUNT = re.compile(r"\b(one|two|three|four|five|six)\s+infected\s+areas?\b", re.IGNORECASE)
_ZONED_LUNG = re.compile(r"((?:upper|middle|lower)(?:\s+(?:upper|middle|lower))*)\s+(left|right)\s+lung", re.IGNORECASE)


def named_count(report: str) -> int | None:
    match = _COUNT.search(report)
    return ("one", "two", "three", "four", "five", "six").index(match.group(1).lower()) + 1 if match else None


def named_zones(report: str) -> dict[str, set[str]]:
    """{side: zones}: "lower left lung and upper middle right lung" -> {left: {lower}, right: {upper, middle}}."""
    zones: dict[str, set[str]] = {}
    for words, side in _ZONED_LUNG.findall(report):
        zones.setdefault(side.lower(), set()).update(word.lower() for word in words.split())
    return zones


def draw_area(logits: torch.Tensor, where: np.ndarray) -> np.ndarray:
    """Draw (in place) the most likely area among the `where` pixels: those connected to the most likely one and at
    least half as likely. Returns the area."""
    foreground = np.where(where, 1 - logits.softmax(0)[0].numpy(), 0)
    areas, _ = ndimage.label(foreground >= 0.5 * foreground.max())
    area = areas == areas[np.unravel_index(foreground.argmax(), foreground.shape)]
    pixels = torch.as_tensor(area)
    logits[0][pixels] = logits[1:].max(0).values[pixels] - 1.0
    return area


def lung_fields(image: np.ndarray) -> dict[str, np.ndarray]:
    """Each side's lung field in an (X, Y) image: its largest dark region that does not touch the image border."""
    size = image.shape[0]
    smooth = ndimage.gaussian_filter(image, size / 64)
    dark = smooth < threshold_otsu(smooth)
    links = max(1, size // 32)
    regions, count = ndimage.label(ndimage.binary_erosion(dark, iterations=links, border_value=1))
    border = set(np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])))
    fields = {}
    for side in SIDES:
        half = np.zeros_like(dark)
        half[side_region(side, size)] = True
        sizes = {i: int((half & (regions == i)).sum()) for i in range(1, count + 1) if i not in border}
        if sizes and max(sizes.values()) > 0.01 * size * size:
            grown = ndimage.binary_dilation(regions == max(sizes, key=sizes.get), iterations=links) & dark
            fields[side] = ndimage.binary_fill_holes(grown)
    return fields


def with_count(logits: torch.Tensor, report: str, image: np.ndarray) -> torch.Tensor:
    logits = obey_reports(logits[None], [report])[0].clone()
    count, sides = named_count(report), named_sides(report)
    if count is None or not sides:
        return logits
    named = np.zeros(logits.shape[1:], bool)
    for side in sides:
        named[side_region(side, logits.shape[1])] = True
    drawn = (logits.argmax(0) > 0).numpy()
    areas, found = ndimage.label(drawn)
    while found < count:
        free = named & ~ndimage.binary_dilation(drawn, iterations=2)
        if (1 - logits.softmax(0)[0].numpy())[free].max(initial=0) < 0.05:
            break
        drawn |= draw_area(logits, free)
        found += 1
    areas, found = ndimage.label(drawn)
    foreground = 1 - logits.softmax(0)[0].numpy()
    peaks = [foreground[areas == i].max() for i in range(1, found + 1)]
    for i in np.argsort(peaks)[: max(0, found - count)]:
        logits[1:, torch.as_tensor(areas == i + 1)] = logits[0][torch.as_tensor(areas == i + 1)] - 30.0
    return logits


def with_zones(logits: torch.Tensor, report: str, image: np.ndarray) -> torch.Tensor:
    logits = obey_reports(logits[None], [report])[0].clone()
    fields = lung_fields(image)
    for side, zones in named_zones(report).items():
        if side not in fields:
            continue
        rows = np.flatnonzero(fields[side].any(axis=0))
        top, height = rows[0], rows[-1] + 1 - rows[0]
        for zone in zones:
            box = np.zeros(logits.shape[1:], bool)
            k = ZONES.index(zone)
            box[side_region(side, logits.shape[1])[0], top + k * height // 3 : top + (k + 1) * height // 3] = True
            if not (logits.argmax(0) > 0).numpy()[box].any():
                draw_area(logits, box)
    return logits


DECODINGS = {
    "as drawn": None,
    "sides": lambda logits, report, image: obey_reports(logits[None], [report])[0],
    "sides+count": with_count,
    "sides+zones": with_zones,
}


def _scores(logits: torch.Tensor, test: list[dict]) -> dict:
    masks = [label_map(lg, item["original_shape"]) for lg, item in zip(logits, test)]
    oracle = area_oracle(masks, test, 2)
    return {"dice": score_masks(masks, test, 2)["mean"]["dice"], "missed": oracle["missed_areas"],
            "false": oracle["false_areas"]}


def _decoded(rule, logits: torch.Tensor, test: list[dict]) -> torch.Tensor:
    if rule is None:
        return logits
    return torch.stack([rule(lg, item["report"], item["image"][0].numpy()) for lg, item in zip(logits, test)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per seed (the tables: 400)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = TextDiffConfig.from_dict({"backbone": {"pretrained": args.backbone},  # the head the tables were measured with
                                    "head": {"per_scale_entry": False},
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
        held_out = dataclasses.replace(cfg.train, min_val_images=1)  # as measured: a fifth held out, from 4 on
        train, val = split_train_val(labeled, held_out, seed)
        drawn = {item["id"] for item in labeled}
        train += [with_empty_mask(item) for item in pool if item["id"] in healthy and item["id"] not in drawn]
        torch.manual_seed(seed)
        model = TextDiffModel(cfg, cache.extractor, text)
        epochs = epochs_for(args.steps, len(train), cfg.train.batch_size)
        train_head(model, train, val, dataclasses.replace(cfg.train, epochs=epochs, seed=seed), cache=cache,
                   progress=False)
        logits = predict_logits(model, test, cache)
        rows.append({"seed": seed, **{name: _scores(_decoded(rule, logits, test), test)
                                      for name, rule in DECODINGS.items()}})
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} seeds | mean Dice | minus as drawn (sd, better in) | missed | false areas")
    for name in DECODINGS:
        gains = [row[name]["dice"] - row["as drawn"]["dice"] for row in rows]
        print(f"{name:12s} | {statistics.mean(row[name]['dice'] for row in rows):.4f} | {statistics.mean(gains):+.4f} "
              f"({statistics.pstdev(gains):.4f}, {sum(g > 0 for g in gains)}) | "
              f"{sum(row[name]['missed'] for row in rows)} | {sum(row[name]['false'] for row in rows)}")


if __name__ == "__main__":
    main()
