"""Whether a backbone's frozen features set the labeled structures apart: per-pixel probes fitted on them.

    python benchmarks/scripts/feature_probe.py --data runs/mni256-deep-dev --backbone runs/mni-wm/backbone \
        --labels 5 --seeds 0 1 2 --set '{"head.label_names": ["background", "left", "right", "ventricles"]}' \
        --out runs/probe/deep.json

A head that cannot fit its own training images may lack features or training. This separates the two: per seed, the
`--labels` images `textdiff-bench benchmark` and `time-to-model` draw from <data>/train fit each probe pixel by pixel
(read in the head's training windows, the backbone's features of every scale upsampled to the window), with
cross-entropy weighted by class frequency^-0.5 (--class-weight-power) and Adam on random pixels from all windows at
once (or, with --windows-per-step, on every pixel of a few random windows a step, as the head draws); each probe is then
scored as evaluation scores (Dice per image and class on the working grid; a class absent from image and prediction
counts 1) on those images (the fit) and on <data>/test (validation images, never the test split). Probes: an MLP and a
linear layer on every scale, an MLP on the finest scale alone, and an MLP on the pixel values (no backbone). Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from textdiff.config import TextDiffConfig, with_overrides
from textdiff.data.studies import load_case, read_studies
from textdiff.data.tiling import resolve_tiling, sliding_logits, windows_of
from textdiff.model.backbone import make_extractor
from textdiff.model.features import FeatureCache
from textdiff_bench.benchmark import _pool, _subset

PROBES = {"MLP, every scale": ("all", 128), "linear, every scale": ("all", 0), "MLP, finest scale": ("finest", 128),
          "MLP, pixel values": ("pixels", 128)}


def pixel_inputs(window: dict, cache: FeatureCache, source: str) -> torch.Tensor:
    """(pixels, channels) of one window: its features (every scale upsampled, or the finest) or its pixel values."""
    size = window["image"].shape[-1]
    if source == "pixels":
        maps = [window["image"][None].float()]
    else:
        features = cache.get(window)
        features = features[-1:] if source == "finest" else features
        maps = [F.interpolate(f[None].float(), size=size, mode="bilinear") for f in features]
    stacked = torch.cat(maps, 1)[0]
    return stacked.reshape(stacked.shape[0], -1).T


def fit_probe(inputs: torch.Tensor, labels: torch.Tensor, classes: int, hidden: int, args, seed: int,
              window_pixels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer (hidden 0) or two-layer MLP on standardised inputs, fitted on random pixels of all windows at
    once (or on every pixel of `args.windows_per_step` random windows of `window_pixels` rows each, as the head draws
    them); returns (pixels, channels) -> (pixels, classes) logits."""
    torch.manual_seed(seed)
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    layers = [torch.nn.Linear(inputs.shape[1], classes)] if not hidden else [
        torch.nn.Linear(inputs.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, classes)]
    probe = torch.nn.Sequential(*layers)
    weight = (torch.bincount(labels, minlength=classes).float() + 1) ** -args.class_weight_power
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3 if hidden else 1e-2)
    for _ in range(args.iterations):
        if args.windows_per_step:
            starts = torch.randperm(len(inputs) // window_pixels)[:args.windows_per_step] * window_pixels
            pick = (starts[:, None] + torch.arange(window_pixels)).flatten()
        else:
            pick = torch.randint(0, len(inputs), (min(65536, len(inputs)),))
        loss = F.cross_entropy(probe((inputs[pick] - mean) / std), labels[pick], weight=weight / weight.mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lambda x: probe((x - mean) / std)


def image_dice(items: list[dict], predict, window: int, classes: int) -> dict:
    """Mean foreground Dice and Dice per class over images, each image read in windows half a window apart and blended
    (Gaussian weights, as `sliding_logits` blends the head's)."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    rows = []
    with torch.no_grad():
        for item in items:
            def logits_of(windows):
                return torch.stack([predict(w).T.reshape(classes, window, window) for w in windows])
            mask = sliding_logits(item, window, 0.5, logits_of).argmax(0)
            rows.append(metric(one_hot(mask[None, None], classes), one_hot(item["label"][None].long(), classes))[0])
    rows = torch.stack(rows)
    return {"dice": round(float(rows.nanmean(1).mean()), 4),
            "class_dice": [round(float(d), 3) for d in rows.nanmean(0)]}


def probe_seed(cache: FeatureCache, backbone, classes: int, train: list[dict], test: list[dict], args,
               seed: int) -> list[dict]:
    """The probes `args` names fitted on `train` and scored on it and on `test`: a row each."""
    windows = windows_of(train, backbone.image_size)
    labels = torch.cat([w["label"].flatten().long() for w in windows])
    rows = []
    for name in args.probes:
        source, hidden = PROBES[name]
        start = time.perf_counter()
        probe = fit_probe(torch.cat([pixel_inputs(w, cache, source) for w in windows]), labels, classes, hidden,
                          args, seed, backbone.image_size ** 2)
        predict = lambda w: probe(pixel_inputs(w, cache, source))  # noqa: E731
        rows.append({"seed": seed, "probe": name, "labeled": [item["id"] for item in train], "windows": len(windows),
                     "fit": image_dice(train, predict, backbone.image_size, classes),
                     "test": image_dice(test, predict, backbone.image_size, classes),
                     "seconds": round(time.perf_counter() - start)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="train/ (the labeled pool) and test/")
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--labels", type=int, default=5, help="labeled images per seed (the benchmark's draw)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", type=json.loads, default={}, help="JSON: config overrides (label names, read-out)")
    parser.add_argument("--iterations", type=int, default=300, help="Adam steps of 65536 random pixels")
    parser.add_argument("--class-weight-power", type=float, default=0.5,
                        help="cross-entropy weighted by class frequency^-power (0: unweighted)")
    parser.add_argument("--windows-per-step", type=int,
                        help="every pixel of this many random windows a step (default: 65536 pixels of all windows)")
    parser.add_argument("--probes", nargs="+", choices=list(PROBES), default=list(PROBES), help="which probes to fit")
    parser.add_argument("--out", type=Path, required=True, help="JSON file")
    args = parser.parse_args()
    cfg = with_overrides(TextDiffConfig(), {"backbone.pretrained": args.backbone, **args.set})
    extractor, classes = make_extractor(cfg.backbone), cfg.head.num_classes
    # the read-out and tiling a head on this backbone has (`TextDiffModel`), without its text encoder
    backbone = resolve_tiling(dataclasses.replace(cfg.backbone, **extractor.architecture,
                                                  feature_layers=extractor.cfg.feature_layers), args.backbone)
    cache = FeatureCache(extractor)
    load = lambda cases: [load_case(c, backbone.image_size, backbone.in_channels, classes, backbone)  # noqa: E731
                          for c in cases]  # as `time-to-model` loads them, so a seed draws the same images
    pool, test = load(_pool(args.data)), load(read_studies(args.data / "test"))
    rows = [row for seed in args.seeds for row in
            probe_seed(cache, backbone, classes, _subset(pool, args.labels, seed), test, args, seed)]
    print("Dice, mean (per class): on the images fitted | on test/")
    for row in rows:
        print(f"seed {row['seed']} {row['probe']:>20}: {row['fit']['dice']:.3f} {row['fit']['class_dice']} | "
              f"{row['test']['dice']:.3f} {row['test']['class_dice']}")
    command = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
