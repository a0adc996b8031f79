"""`textdiff time-to-model`: test Dice against the wall-clock minutes it takes to get the model, on this machine.

For each seed's labeled subset (drawn as `textdiff benchmark` draws it) every method trains at a few budgets, and
each run gives one point: (minutes of training, Dice on the test split). Methods:
- "TextDiff head": the head on the pretrained backbone at each of `head_steps` (train.steps);
- "TextDiff head, continued after a label": the same budgets, starting from the head trained (at the default budget)
  on the subset with one label fewer, as the app retrains after a new label (`continue_from_current`);
- "TextDiff, pretraining + head": for each backbone pretrained for a known time (`pretrained`: minutes -> folder),
  the head at the default budget, its point placed at the pretraining minutes plus the head's;
- "MONAI UNet" from scratch at each of `unet_steps`, without and with flips (the same loss, windows and checkpoint
  choice as `textdiff benchmark`'s UNet).
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

from textdiff.config import TextDiffConfig
from textdiff.data.studies import read_studies
from textdiff.data.tiling import windows_of
from textdiff.model.backbone import make_extractor
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel
from textdiff.model.text import TextEncoder
from textdiff.plots import plot_timelines
from textdiff.research.benchmark import _pool, _subset, _train_unet, _unet_masks, epochs_for
from textdiff.training.inference import score_masks, segment_items
from textdiff.training.intensity import training_windows
from textdiff.training.train import split_train_val, train_head


@dataclass
class TimeToModelSettings:
    labels: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    head_steps: tuple[int, ...] = (25, 50, 100, 200)
    unet_steps: tuple[int, ...] = (100, 200, 400, 800)
    pretrained: dict[float, str] = field(default_factory=dict)  # pretraining minutes -> backbone folder


CONTINUED = "TextDiff head, continued after a label"


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
    dice = score_masks(segment_items(model, test, test_cache), test, cfg.head.num_classes)["mean"]["dice"]
    return {"steps": train_cfg.steps, "minutes": minutes, "dice": dice, "head": model.head.state_dict()}


def _unet_point(backbones: _Backbones, folder: str, labels: int, seed: int, steps: int, augment: str) -> dict:
    cfg, _, pool, test, _ = backbones.get(folder)
    train_cfg = dataclasses.replace(cfg.train, seed=seed, augment=augment)
    train, val = split_train_val(_subset(pool, labels, seed), train_cfg, seed)
    windows = training_windows(train, cfg.backbone.image_size, train_cfg)
    start = time.perf_counter()
    net = _train_unet(windows, windows_of(val, cfg.backbone.image_size),
                      epochs_for(steps, len(windows), train_cfg.batch_size), train_cfg, backbones.device,
                      cfg.head.num_classes)
    minutes = (time.perf_counter() - start) / 60
    masks = _unet_masks(net, test, backbones.device, cfg.backbone.image_size, cfg.backbone.window_overlap)
    return {"steps": steps, "minutes": minutes, "dice": score_masks(masks, test, cfg.head.num_classes)["mean"]["dice"]}


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

    for seed in settings.seeds:
        for steps in settings.head_steps:
            record("TextDiff head", seed, _head_point(backbones, backbone, settings.labels, seed, steps))
        if settings.labels > 1:  # a retrain after one more label, from the head trained before it
            before = _head_point(backbones, backbone, settings.labels - 1, seed, None)["head"]
            for steps in settings.head_steps:
                record(CONTINUED, seed, _head_point(backbones, backbone, settings.labels, seed, steps, before))
        for minutes, folder in sorted(settings.pretrained.items()):
            point = _head_point(backbones, folder, settings.labels, seed, None)
            record("TextDiff, pretraining + head", seed, {**point, "budget": f"{minutes:g} min"}, minutes)
        for augment, name in (("none", "MONAI UNet"), ("flip", "MONAI UNet, flips")):
            for steps in settings.unet_steps:
                record(name, seed, _unet_point(backbones, backbone, settings.labels, seed, steps, augment))
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
