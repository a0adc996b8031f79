"""Putting a trained model in service: only at the end of a run, atomically, and never one worse than the current.

A run trains into `<name>.candidate.pt`; a killed or stopped run therefore leaves the model in service untouched.
At its end the candidate and the current model are scored on images neither learned where there are any
(`textdiff.training.comparison`: held-out validation images, or labels new to the model in service left out of
extra runs); the candidate replaces the current one when its Dice is at least as high (or the client forces it).
The replaced model stays as `<name>.prev.pt`, and `rollback` swaps the two back.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from textdiff.data.studies import Case
from textdiff.evaluation import dice_on_cases
from textdiff.model.segmenter import TextDiffModel, load_checkpoint
from textdiff.training.comparison import Basis, compare_on_basis

logger = logging.getLogger(__name__)


def candidate_path(current: Path) -> Path:
    return current.with_name(f"{current.stem}.candidate{current.suffix}")


def previous_path(current: Path) -> Path:
    return current.with_name(f"{current.stem}.prev{current.suffix}")


def current_dice(current: Path, cases: list[Case], device: str, label_names: tuple[str, ...],
                 volume_slices: str = "all") -> float | None:
    """The model in service's Dice on `cases` (on the slices of volumes `volume_slices` picks); None when there is
    none, or it cannot segment these labels."""
    if not current.is_file():
        return None
    try:
        model = load_checkpoint(current, device)
    except Exception as err:  # noqa: BLE001 - an unreadable model in service must not block a good one
        logger.warning("the model in service (%s) cannot be loaded (%s): the new one replaces it", current, err)
        return None
    if model.cfg.head.label_names != label_names:
        return None
    return dice_on_cases(model, cases, volume_slices)


def publish_if_better(model: TextDiffModel, current: Path, basis: Basis, device: str, force: bool,
                      left_out_dice: Callable[[], dict[str, float]] | None = None) -> dict:
    """Compare the trained `model` (saved at `candidate_path(current)`) with the model in service on `basis` and
    publish it when it is not worse, or when `force`; returns what was decided, on which images, and both scores.
    A left-out basis scores the new recipe by `left_out_dice` (extra runs, image id -> Dice), only when there is a
    model to beat; without any left-out score the new model is scored as trained."""
    volume_slices = model.cfg.train.volume_slices  # both models are judged on the slices this run trained on
    start = time.perf_counter()
    verdict = compare_on_basis(
        basis, lambda cases: dice_on_cases(model, cases, volume_slices),
        lambda cases: current_dice(current, cases, device, model.cfg.head.label_names, volume_slices),
        None if force else left_out_dice)
    new, old, cases, says = verdict.new, verdict.old, verdict.cases, basis.says
    if basis.kind == "left-out" and not verdict.by_left_out_runs:
        says = "labels new to the model in service, the new model as trained"
    published = force or verdict.better
    if old is None:
        says = f"no model in service to compare with (the new one scored on {len(cases)} images)"
    decision = {"published": published, "validation_dice": round(new, 4),
                "current_validation_dice": None if old is None else round(old, 4),
                "compared_on": [case.id for case in cases], "compared_on_images": says,
                "comparison_seconds": round(time.perf_counter() - start, 1), "forced": bool(force)}
    if published:
        replace(candidate_path(current), current)
        logger.info("published the new model (Dice %.4f, the previous one %s, on %s)", new,
                    "none" if old is None else f"{old:.4f}", says)
    else:
        logger.warning("kept the model in service: its Dice %.4f beats the new one's %.4f on %s (the new one stays in "
                       "%s; train with force=true to publish it anyway)", old, new, says, candidate_path(current))
    return decision


def replace(new: Path, current: Path) -> None:
    """`new` becomes `current`; the current one is kept as `previous_path(current)`. Readers always see a whole file."""
    if current.is_file():
        staging = previous_path(current).with_suffix(".tmp")
        shutil.copy2(current, staging)
        os.replace(staging, previous_path(current))
    os.replace(new, current)


def rollback(current: Path) -> None:
    """Swap the model in service and the one it replaced; FileNotFoundError when there is none to go back to."""
    previous = previous_path(current)
    if not previous.is_file():
        raise FileNotFoundError(f"no previous model to roll back to ({previous.name} does not exist)")
    staging = current.with_suffix(".rollback.tmp")
    shutil.copy2(previous, staging)
    replace(staging, current)
