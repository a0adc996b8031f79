"""`textdiff-bench al-benchmark`: replay the labeling loop on a data set and compare how strategies pick images.

Every strategy starts from the same seeded `start` labeled images, trains TextDiff as `textdiff-bench benchmark` does (the
app's reading of each image and, unless `steps` is given, its step budget), scores the test split, then "asks the
clinician" for `step` more masks (from train-groundtruth/, else the pool's own masks) chosen by the strategy, for
`rounds` rounds. Each round trains a new head, or with `continued` starts from the last round's head, as the app's
retrains do after new labels (`continue_from_current`). With `gate`, a round's model replaces the last one only
where the app's publish gate would publish it; the next round continues from (and is judged against) the model kept.
Images known to be normal (image-level label `train.healthy_label`) are never asked for: they join training with an
empty mask, as in the app. Prints a table of test Dice per round and writes al_results.json and
al_dice_per_round.png. Seeds can run as separate processes (or machines) and be summarised together afterwards
(`textdiff-bench al-summary`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from textdiff.activelearning import image_embeddings, pick_diverse, uncertainty_scores
from textdiff.config import TextDiffConfig
from textdiff.data.studies import Case, read_studies
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel
from textdiff.plots import plot_curves
from textdiff_bench.benchmark import BenchmarkSettings, _masks, _Models, _pool, _split, _subset
from textdiff.evaluation import score_masks, segment_items
from textdiff.training.comparison import compare_on_basis, comparison_basis, left_out_dice
from textdiff.training.options.extra_labels import healthy_cases

STRATEGIES = ("random", "uncertainty", "diverse")


@dataclass
class LabelingSettings:
    start: int = 5
    step: int = 5
    rounds: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    # Optimizer steps per training in passes over the training windows (as `textdiff-bench benchmark --steps`); None: the
    # app's step budget (train.steps)
    steps: int | None = None
    strategies: tuple[str, ...] = STRATEGIES
    # Each round's training starts from the last round's head, as the app's retrains do (`continue_from_current`);
    # False: every round trains a new head
    continued: bool = False
    # The app's publish gate between rounds (publish_gate): a round it would not publish keeps the last round's model,
    # whose test Dice the round reports
    gate: bool = False
    # New labels the gate may leave out of one more run each when nothing is held out (the app's `left_out_runs`)
    left_out_runs: int = 1


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


def publish_gate(candidate: TextDiffModel, service: TextDiffModel, labeled: list[Case], held_out: list[Case],
                 seen: set[str], cfg: TextDiffConfig, cache: FeatureCache, device: torch.device,
                 left_out_runs: int = 1) -> dict:
    """What the app's publish gate decides between a retrained model and the one in service: both scored on the
    images `comparison_basis` picks (the run's held-out images, else new labels each left out of one more run of the
    recipe, at most `left_out_runs` of them, else the labeled images), the new one published when it is not worse
    (`compare_on_basis`, as the app decides)."""
    basis = comparison_basis(labeled, held_out, seen, max_left_out=left_out_runs, seed=cfg.train.seed)

    def dice(model: TextDiffModel) -> Callable[[list[Case]], float]:
        def on(cases: list[Case]) -> float:
            items = [model.load(case) for case in cases]
            return score_masks(segment_items(model, items, cache=cache), items, cfg.head.num_classes)["mean"]["dice"]
        return on

    verdict = compare_on_basis(basis, dice(candidate), dice(service), lambda: left_out_dice(
        cfg, labeled, basis.cases, device, None, initial_head=service.head.state_dict()))
    return {"published": verdict.better, "gate_dice": round(verdict.new, 4),
            "service_gate_dice": round(verdict.old, 4), "compared_on": basis.kind}


def run_labeling_benchmark(data: Path, backbone: str | None, out: Path, settings: LabelingSettings,
                           cfg: TextDiffConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = _Models(cfg, backbone, device)
    probe, cache = models.model("textdiff"), models.cache("textdiff")
    pool_cases = _pool(data)
    by_id = {case.id: case for case in pool_cases}
    healthy = {c.id for c in healthy_cases([dataclasses.replace(c, label=None) for c in pool_cases],
                                           cfg.train.healthy_label)}
    pool = [probe.load(c) for c in pool_cases]
    candidates = [item for item in pool if item["id"] not in healthy]  # what a clinician could be asked to draw
    test = [probe.load(c) for c in read_studies(data / "test")]
    bench = BenchmarkSettings(steps=settings.steps, methods=("textdiff",), timing=False)

    def train_and_score(labeled: list[dict], seed: int, last: _Served | None = None) -> tuple[_Served, float, dict]:
        start = time.perf_counter()
        split = _split(pool, healthy, labeled, seed, models.cfg, bench, {})
        initial = last.model.head.state_dict() if settings.continued and last is not None else None
        masks = _masks("textdiff", split, test, models, bench, seed, initial)
        served = _Served(models.last["textdiff"], score_masks(masks, test, probe.cfg.head.num_classes)["mean"]["dice"],
                         {item["id"] for item in labeled})
        decision = {}
        if settings.gate and last is not None:
            run_cfg = dataclasses.replace(models.cfg, train=dataclasses.replace(models.cfg.train, epochs=split.epochs,
                                                                                seed=seed))
            decision = publish_gate(served.model, last.model, [by_id[it["id"]] for it in labeled],
                                    [by_id[it["id"]] for it in split.val], last.seen, run_cfg, cache, models.device,
                                    settings.left_out_runs)
            decision["candidate_dice"] = served.dice
            served = served if decision["published"] else last
        return served, time.perf_counter() - start, decision

    rows = []
    for seed in settings.seeds:
        start = _subset(candidates, settings.start, seed)
        first = train_and_score(start, seed)  # the same first round for every strategy
        for strategy in settings.strategies:
            rows += _replay(strategy, seed, start, first, candidates, settings, train_and_score, cache)
    (out / "al_results.json").write_text(json.dumps({"rows": rows, "settings": dataclasses.asdict(settings),
                                                      "backbone": backbone, "healthy": sorted(healthy)}, indent=1))
    return summarise_labeling(rows, out)


@dataclass
class _Served:
    """The model a round leaves in service: what the next round continues from, its test Dice, what it trained on."""

    model: TextDiffModel
    dice: float
    seen: set[str]


def _replay(strategy: str, seed: int, start: list[dict], first: tuple, candidates: list[dict],
            settings: LabelingSettings, train_and_score, cache: FeatureCache) -> list[dict]:
    """One strategy's rounds from the shared first one: a row per round, the strategy asking for the next labels."""
    rng, rows = random.Random(seed), []
    labeled, (served, seconds, decision) = start, first
    for round_ in range(settings.rounds + 1):
        if round_ > 0:
            served, seconds, decision = train_and_score(labeled, seed, served)
        rows.append({"strategy": strategy, "continued": settings.continued, "gate": settings.gate, "seed": seed,
                     "round": round_, "labels": len(labeled), "dice": served.dice, "seconds": seconds, **decision,
                     "picked": [item["id"] for item in labeled]})
        gated = "" if not decision else f", {'published' if decision['published'] else 'kept the last model'}"
        print(f"{strategy:<12} seed={seed} round={round_} labels={len(labeled):<3} dice={served.dice:.4f} "
              f"({seconds:.0f} s{gated})", flush=True)
        if round_ < settings.rounds:
            taken = {item["id"] for item in labeled}
            unlabeled = [item for item in candidates if item["id"] not in taken]
            labeled = labeled + choose(strategy, served.model, cache, labeled, unlabeled, settings.step, rng)
    return rows


def summarise_labeling(rows: list[dict], out: Path) -> dict:
    """Mean ± std of test Dice per strategy (and whether its rounds continued, and were gated) and label count over
    seeds: print a table, write the plot."""
    summary: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        name = (row["strategy"] + (", continued" if row.get("continued") else "")
                + (", gated" if row.get("gate") else ""))
        summary.setdefault(name, {}).setdefault(row["labels"], []).append(row["dice"])
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
