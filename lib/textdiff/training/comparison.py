"""Which images a new model and the one in service are compared on, so that neither is judged on images it learned.

- **held-out**: the run held out validation images (`train.min_val_images` of them or more, from about 8 labeled
  images): the new model never trained on them; those the model in service never saw either are preferred.
- **left-out**: none held out (few labels), but some labeled images are new to the model in service (labeled since
  it was trained): each is left out of a run of the new model's recipe on the other labels, that run is scored on it
  and so is the model in service. The model published still trains on every label.
- **seen**: neither (the same labels as the model in service, or nothing recorded of what it saw): both are scored on
  the labeled images, which both may have learned, and the result says so.

A checkpoint records the images its run read (`seen_images`), so a later run knows what the model in service saw.
"""

from __future__ import annotations

import logging
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from textdiff.config import TextDiffConfig
from textdiff.data.studies import Case, DataError
from textdiff.evaluation import dice_on_cases
from textdiff.training.runs import train_on_cases

logger = logging.getLogger(__name__)

SAYS = {"held-out": "validation images this run held out{fresh}",
        "left-out": "labels the model in service never saw, each scored by a run of this recipe without it",
        "seen": "labeled images that both models may have trained on ({why})"}


@dataclass
class Basis:
    kind: str  # "held-out", "left-out" or "seen"
    cases: list[Case]
    says: str  # what the images are, for the stats and the log


def comparison_basis(labeled: list[Case], held_out: list[Case], seen: set[str] | None, max_left_out: int,
                     seed: int = 0) -> Basis:
    """The images to compare on (see the module's docstring); `seen` is what the model in service read (None: not
    recorded), `max_left_out` caps the runs a left-out comparison trains (a seeded draw of the new labels)."""
    new = [c for c in labeled if seen is not None and c.id not in seen]
    if held_out:
        fresh = [c for c in held_out if c in new]
        return Basis("held-out", fresh or held_out, SAYS["held-out"].format(
            fresh=", never seen by the model in service" if fresh else " (the model in service may have seen them)"))
    if new and max_left_out > 0:
        chosen = sorted(random.Random(seed).sample(new, min(len(new), max_left_out)), key=lambda c: c.id)
        return Basis("left-out", chosen, SAYS["left-out"])
    why = "nothing is recorded of what the model in service saw" if seen is None else "no label is new to it"
    return Basis("seen", labeled, SAYS["seen"].format(why=why))


@dataclass
class Verdict:
    """A new model against the one in service on a basis: both Dice on the same images."""

    new: float
    old: float | None  # None: no model in service to beat
    cases: list[Case]  # the images both were scored on
    by_left_out_runs: bool  # the new recipe was scored by left-out runs, not the new model as trained

    @property
    def better(self) -> bool:
        """The new model is not worse than the one in service (or there is none)."""
        return self.old is None or self.new >= self.old


def compare_on_basis(basis: Basis, new_dice: Callable[[list[Case]], float],
                     old_dice: Callable[[list[Case]], float | None],
                     left_out: Callable[[], dict[str, float]] | None = None) -> Verdict:
    """Score the new model and the one in service on `basis`. A left-out basis scores the new recipe by `left_out`
    (its extra runs, image id -> Dice; only when there is a model to beat) on the images it could leave out; without
    any left-out score, the new model as trained is scored on the basis's images."""
    cases = basis.cases
    old = old_dice(cases)
    scores = left_out() if basis.kind == "left-out" and old is not None and left_out else {}
    if scores:
        cases = [case for case in cases if case.id in scores]
        return Verdict(statistics.mean(scores.values()), old_dice(cases), cases, True)
    return Verdict(new_dice(cases), old, cases, False)


def left_out_dice(cfg: TextDiffConfig, labeled: list[Case], left_out: list[Case], device: str,
                  cache_folder: Path | None, initial_head: dict | None = None,
                  images: dict | None = None) -> dict[str, float]:
    """Image id -> Dice on it of a run of `cfg` from `initial_head` on `labeled` without it, for each of `left_out`;
    `images` are the run's other `train_on_cases` images (pseudo_cases, healthy, unlabeled, synthetic), the left-out
    one taken out of them too. An image whose leaving out leaves nothing to train on is skipped."""
    dice, start = {}, time.perf_counter()
    for case in left_out:
        others = {key: _without(value, case.id) for key, value in (images or {}).items()}
        with tempfile.TemporaryDirectory() as folder:
            try:
                model, _ = train_on_cases([c for c in labeled if c.id != case.id], cfg, Path(folder) / "left-out.pt",
                                          device, progress=False, cache_folder=cache_folder,
                                          initial_head=initial_head, **others)
            except DataError as err:
                logger.info("cannot leave %s out: %s", case.id, err)
                continue
        dice[case.id] = dice_on_cases(model, [case], cfg.train.volume_slices)
        logger.info("left %s out: Dice %.4f on it", case.id, dice[case.id])
    logger.info("%d left-out runs in %.0f s", len(dice), time.perf_counter() - start)
    return dice


def _without(value, key: str):
    """A run argument without image `key`: a list of cases, a dict of synthetic copies by source id, or None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {source: copies for source, copies in value.items() if source != key}
    return [c for c in value if c.id != key]

