"""`textdiff al-benchmark`: simulate the labeling loop on the sample data and compare how strategies pick images.

Every strategy starts from the same seeded `start` labeled images, trains TextDiff, scores the test split, then
"asks the clinician" for `step` more masks (taken from train-groundtruth/) chosen by the strategy, for `rounds`
rounds. Prints a table of test Dice per round and writes al_results.json and al_dice_per_round.png.
Seeds can run as separate processes (or machines) and be summarised together afterwards (`textdiff al-summary`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from textdiff.activelearning import image_embeddings, pick_diverse, uncertainty_scores
from textdiff.model.backbone import make_extractor
from textdiff.research.benchmark import _pool, _subset, epochs_for
from textdiff.config import TextDiffConfig
from textdiff.data.studies import load_case, read_studies
from textdiff.model.features import FeatureCache
from textdiff.training.inference import score_masks, segment_items
from textdiff.model.segmenter import TextDiffModel
from textdiff.plots import plot_curves
from textdiff.model.text import TextEncoder
from textdiff.training.train import split_train_val, train_head

STRATEGIES = ("random", "uncertainty", "diverse")


@dataclass
class LabelingSettings:
    start: int = 5
    step: int = 5
    rounds: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    strategies: tuple[str, ...] = STRATEGIES


def choose(strategy: str, model: TextDiffModel, cache: FeatureCache, labeled: list[dict], unlabeled: list[dict],
           count: int, rng: random.Random) -> list[dict]:
    """The `count` unlabeled items a strategy asks to label next."""
    if strategy == "random":
        return rng.sample(unlabeled, min(count, len(unlabeled)))
    if strategy == "uncertainty":
        scores = uncertainty_scores(model, unlabeled, cache)
        order = sorted(range(len(unlabeled)), key=lambda i: -scores[i])
        return [unlabeled[i] for i in order[:count]]
    if strategy == "diverse":
        picks = pick_diverse(image_embeddings(cache, unlabeled), image_embeddings(cache, labeled), count)
        return [unlabeled[i] for i in picks]
    raise ValueError(f"unknown strategy '{strategy}': use one of {STRATEGIES}")


def run_labeling_benchmark(data: Path, backbone: str | None, out: Path, settings: LabelingSettings,
                           cfg: TextDiffConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=backbone))
    cache = FeatureCache(make_extractor(cfg.backbone).to(device))
    text_encoder = TextEncoder(cfg.text)
    size, channels = cache.extractor.cfg.image_size, cache.extractor.cfg.in_channels
    pool = [load_case(c, size, channels, 2) for c in _pool(data)]
    test = [load_case(c, size, channels, 2) for c in read_studies(data / "test")]
    cache.fill(pool + test, progress=True)  # the slow part, once: every round then reads cached features

    def train_and_score(labeled: list[dict], seed: int) -> tuple[TextDiffModel, float]:
        torch.manual_seed(seed)
        model = TextDiffModel(cfg, cache.extractor, text_encoder).to(device)
        train, val = split_train_val(labeled, cfg.train, seed)
        epochs = epochs_for(settings.steps, len(train), cfg.train.batch_size)
        train_head(model, train, val, dataclasses.replace(cfg.train, epochs=epochs, seed=seed), cache=cache,
                   progress=False)
        return model, score_masks(segment_items(model, test, cache=cache), test, 2)["mean"]["dice"]

    rows = []
    for seed in settings.seeds:
        start = _subset(pool, settings.start, seed)
        start_model, start_dice = train_and_score(start, seed)  # the same first round for every strategy
        for strategy in settings.strategies:
            rng = random.Random(seed)
            labeled, model, dice = start, start_model, start_dice
            for round_ in range(settings.rounds + 1):
                if round_ > 0:
                    model, dice = train_and_score(labeled, seed)
                rows.append({"strategy": strategy, "seed": seed, "round": round_, "labels": len(labeled), "dice": dice,
                             "picked": [item["id"] for item in labeled]})
                print(f"{strategy:<12} seed={seed} round={round_} labels={len(labeled):<3} dice={dice:.4f}", flush=True)
                if round_ < settings.rounds:
                    taken = {item["id"] for item in labeled}
                    unlabeled = [item for item in pool if item["id"] not in taken]
                    labeled = labeled + choose(strategy, model, cache, labeled, unlabeled, settings.step, rng)
    (out / "al_results.json").write_text(json.dumps({"rows": rows, "settings": dataclasses.asdict(settings),
                                                      "backbone": backbone}, indent=1))
    return summarise_labeling(rows, out)


def summarise_labeling(rows: list[dict], out: Path) -> dict:
    """Mean ± std of test Dice per strategy and label count over seeds: print a table, write the plot."""
    summary: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        summary.setdefault(row["strategy"], {}).setdefault(row["labels"], []).append(row["dice"])
    curves = {s: {n: (statistics.mean(v), statistics.pstdev(v)) for n, v in by.items()} for s, by in summary.items()}
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, out / "al_dice_per_round.png", "labeled training images",
                "Simulated labeling: test Dice per round")
    counts = sorted({row["labels"] for row in rows})
    lines = ["| strategy | " + " | ".join(f"{n} labels" for n in counts) + " |", "|" + "---|" * (len(counts) + 1)]
    for strategy, by in curves.items():
        lines.append(f"| {strategy} | " + " | ".join(f"{by[n][0]:.3f} ± {by[n][1]:.3f}" for n in counts) + " |")
    print(f"seeds: {sorted({row['seed'] for row in rows})}")
    print("\n".join(lines))
    return {"rows": rows, "curves": curves}
