"""`textdiff-bench time-to-model`: test Dice against the wall-clock minutes it takes to get the model, on this machine.

For each seed's labeled subset (drawn as `textdiff-bench benchmark` draws it) every method trains at a few budgets, and
each run gives one point: (minutes of training, Dice on the test split). Methods:
- "TextDiff head": the head on the pretrained backbone at each of `head_steps` (train.steps);
- "TextDiff head, continued after a label": the same budgets, starting from the head trained (at the default budget)
  on the subset with one label fewer, as the app retrains after a new label (`continue_from_current`);
- "TextDiff, pretraining + head": for each backbone pretrained for a known time (`pretrained`: minutes -> folder),
  the head at the default budget, its point placed at the pretraining minutes plus the head's;
- "MONAI UNet" from scratch at each of `unet_steps`, without and with flips (the same loss, windows and checkpoint
  choice as `textdiff-bench benchmark`'s UNet);
- with `unet_feature_scales` > 0, "MONAI UNet + diffusion features, flips": the same UNet reading the image and the
  frozen backbone's finest feature scales (stitched over the image, standardised per channel) as more input
  channels, so that the features add to what a plain UNet learns; its minutes include computing those features.
Training time includes the diffusion features a run computes (a first training pays for them) and excludes scoring
the test split. Every run is in this process, one after another, on the same threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from textdiff.config import TextDiffConfig
from textdiff.data.studies import read_studies
from textdiff.data.tiling import sliding_logits, windows_of
from textdiff.model.backbone import make_extractor
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel
from textdiff.model.text import TextEncoder
from textdiff.plots import plot_timelines
from textdiff.evaluation import score_masks, segment_items
from textdiff.training.options.intensity import training_windows
from textdiff.training.runs import split_train_val
from textdiff.training.train import train_head
from textdiff_bench.benchmark import _pool, _subset, _train_unet, _unet_masks, epochs_for


CONTINUED = "TextDiff head, continued after a label"
FEATURE_UNET = "MONAI UNet + diffusion features, flips"
METHODS = {"head": "TextDiff head", "continued": CONTINUED, "pretrained": "TextDiff, pretraining + head",
           "unet": "MONAI UNet", "unet-flips": "MONAI UNet, flips", "unet-features": FEATURE_UNET}


@dataclass
class TimeToModelSettings:
    labels: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    head_steps: tuple[int, ...] = (25, 50, 100, 200)
    unet_steps: tuple[int, ...] = (100, 200, 400, 800)
    pretrained: dict[float, str] = field(default_factory=dict)  # pretraining minutes -> backbone folder
    unet_feature_scales: int = 0  # > 0: also the UNet reading the image and this many finest feature scales
    methods: tuple[str, ...] = tuple(METHODS)  # which of METHODS to run (keys)


def hardware() -> str:
    """What the minutes were measured on, for titles and tables: the CPU (or GPU) and the threads torch uses."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU"
    model = platform.processor() or "CPU"
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


class _Backbones:
    """One TextDiff model builder, loaded items and test feature cache per backbone folder."""

    def __init__(self, cfg: TextDiffConfig, data: Path, device: torch.device):
        self.cfg, self.data, self.device, self.text_encoder = cfg, data, device, TextEncoder(cfg.text)
        self._loaded: dict[str, tuple] = {}

    def get(self, folder: str) -> tuple[TextDiffConfig, object, list[dict], list[dict], FeatureCache]:
        """(config, extractor, pool items, test items, test feature cache) of a backbone folder."""
        if folder not in self._loaded:
            cfg = dataclasses.replace(self.cfg, backbone=dataclasses.replace(self.cfg.backbone, pretrained=folder))
            extractor = make_extractor(cfg.backbone).to(self.device)
            probe = TextDiffModel(cfg, extractor, self.text_encoder)
            pool = [probe.load(c) for c in _pool(self.data)]
            test = [probe.load(c) for c in read_studies(self.data / "test")]
            self._loaded[folder] = (probe.cfg, extractor, pool, test, FeatureCache(extractor))
        return self._loaded[folder]

    def test_with_features(self, folder: str, scales: int) -> list[dict]:
        """The test items with their feature channels (`with_feature_channels`), computed once per backbone."""
        if (folder, scales) not in self._loaded:
            cfg, extractor, _, test, _ = self.get(folder)
            self._loaded[folder, scales] = with_feature_channels(test, extractor, cfg.backbone.image_size,
                                                                 cfg.backbone.window_overlap, scales)
        return self._loaded[folder, scales]


def _head_point(backbones: _Backbones, folder: str, labels: int, seed: int, steps: int | None,
                initial: dict | None = None) -> dict:
    """Train the head on a fresh feature cache (`steps` None: the default budget), from `initial` weights when given;
    its minutes, test Dice and trained weights ("head")."""
    cfg, extractor, pool, test, test_cache = backbones.get(folder)
    train_cfg = dataclasses.replace(cfg.train, seed=seed, epochs=None, steps=steps or cfg.train.steps)
    train, val = split_train_val(_subset(pool, labels, seed), train_cfg, seed)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = TextDiffModel(cfg, extractor, backbones.text_encoder).to(backbones.device)
    if initial is not None:
        model.head.load_state_dict(initial)
    train_head(model, train, val, train_cfg, cache=FeatureCache(extractor), progress=False)
    minutes = (time.perf_counter() - start) / 60
    scores = score_masks(segment_items(model, test, test_cache), test, cfg.head.num_classes)["mean"]
    return {"steps": train_cfg.steps, "minutes": minutes, "dice": scores["dice"], "class_dice": scores["class_dice"],
            "head": model.head.state_dict()}


@torch.no_grad()
def with_feature_channels(items: list[dict], extractor, window: int, overlap: float, scales: int) -> list[dict]:
    """Items whose image also carries the `scales` finest feature maps of the frozen backbone, blended over the
    working grid from its windows and standardised per channel: the input of a UNet that reads both."""
    def finest(windows: list[dict]) -> torch.Tensor:
        features = extractor(torch.stack([w["image"] for w in windows]), [w["report"] for w in windows])
        return torch.cat([F.interpolate(f.float().cpu(), size=(window, window), mode="bilinear", align_corners=False)
                          for f in features[-scales:]], dim=1)

    out = []
    for item in items:
        maps = sliding_logits(item, window, overlap, finest)
        maps = (maps - maps.mean(dim=(1, 2), keepdim=True)) / (maps.std(dim=(1, 2), keepdim=True) + 1e-6)
        out.append({**item, "image": torch.cat([torch.as_tensor(item["image"]), maps])})
    return out


def _unet_point(backbones: _Backbones, folder: str, labels: int, seed: int, steps: int, augment: str,
                feature_scales: int = 0) -> dict:
    cfg, extractor, pool, test, _ = backbones.get(folder)
    train_cfg = dataclasses.replace(cfg.train, seed=seed, augment=augment)
    train, val = split_train_val(_subset(pool, labels, seed), train_cfg, seed)
    start = time.perf_counter()
    if feature_scales:
        window, overlap = cfg.backbone.image_size, cfg.backbone.window_overlap
        train, val = (with_feature_channels(items, extractor, window, overlap, feature_scales) for items in (train, val))
    windows = training_windows(train, cfg.backbone.image_size, train_cfg)
    net = _train_unet(windows, windows_of(val, cfg.backbone.image_size),
                      epochs_for(steps, len(windows), train_cfg.batch_size), train_cfg, backbones.device,
                      cfg.head.num_classes)
    minutes = (time.perf_counter() - start) / 60
    if feature_scales:  # the test images' features are scoring, not training: computed once, outside the minutes
        test = backbones.test_with_features(folder, feature_scales)
    masks = _unet_masks(net, test, backbones.device, cfg.backbone.image_size, cfg.backbone.window_overlap)
    scores = score_masks(masks, test, cfg.head.num_classes)["mean"]
    return {"steps": steps, "minutes": minutes, "dice": scores["dice"], "class_dice": scores["class_dice"]}


def run_time_to_model(data: Path, backbone: str, out: Path, settings: TimeToModelSettings,
                      cfg: TextDiffConfig) -> dict:
    """Every method at every budget for every seed; print the table, write results.json and dice_vs_minutes.png."""
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbones, rows = _Backbones(cfg, data, device), []

    def record(method: str, seed: int, point: dict, extra_minutes: float = 0.0) -> None:
        point = {k: v for k, v in point.items() if k != "head"}
        rows.append({"method": method, "seed": seed, "budget": f"{point['steps']} steps", **point,
                     "minutes": point["minutes"] + extra_minutes})
        print(f"{method:<30} seed={seed} budget={rows[-1]['budget']:<10} minutes={rows[-1]['minutes']:.2f} "
              f"dice={point['dice']:.4f}", flush=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "partial": True}, indent=1))

    run = set(settings.methods)
    for seed in settings.seeds:
        for steps in settings.head_steps if "head" in run else ():
            record(METHODS["head"], seed, _head_point(backbones, backbone, settings.labels, seed, steps))
        if "continued" in run and settings.labels > 1:  # a retrain after one more label, from the head before it
            before = _head_point(backbones, backbone, settings.labels - 1, seed, None)["head"]
            for steps in settings.head_steps:
                record(CONTINUED, seed, _head_point(backbones, backbone, settings.labels, seed, steps, before))
        for minutes, folder in sorted(settings.pretrained.items()) if "pretrained" in run else ():
            point = _head_point(backbones, folder, settings.labels, seed, None)
            record(METHODS["pretrained"], seed, {**point, "budget": f"{minutes:g} min"}, minutes)
        for key, augment, scales in (("unet", "none", 0), ("unet-flips", "flip", 0),
                                     ("unet-features", "flip", settings.unet_feature_scales)):
            for steps in settings.unet_steps if key in run and (scales or key != "unet-features") else ():
                record(METHODS[key], seed, _unet_point(backbones, backbone, settings.labels, seed, steps, augment, scales))
    result = {"rows": rows, "hardware": hardware(), "labels": settings.labels, "backbone": backbone,
              "summary": summarise_timelines(rows)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot_timelines(result["summary"], out / "dice_vs_minutes.png",
                   f"{data.name}, {settings.labels} labels: test Dice vs training minutes\n{result['hardware']}")
    print(format_timelines(result["summary"]))
    return result


def summarise_timelines(rows: list[dict]) -> dict[str, list[dict]]:
    """Per method, per budget: mean minutes, mean and sd of Dice over seeds, in the order of the budgets."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        groups.setdefault(row["method"], {}).setdefault(row["budget"], []).append(row)
    return {method: [{"budget": budget, "minutes": statistics.mean(r["minutes"] for r in runs),
                      "dice": statistics.mean(r["dice"] for r in runs),
                      "sd": statistics.pstdev([r["dice"] for r in runs]), "seeds": len(runs)}
                     for budget, runs in budgets.items()]
            for method, budgets in groups.items()}


def format_timelines(summary: dict[str, list[dict]]) -> str:
    lines = ["| method | budget | minutes | Dice (mean ± sd) | seeds |", "|---|---|---|---|---|"]
    for method, points in summary.items():
        lines += [f"| {method} | {p['budget']} | {p['minutes']:.2f} | {p['dice']:.3f} ± {p['sd']:.3f} | {p['seeds']} |"
                  for p in points]
    return "\n".join(lines)
