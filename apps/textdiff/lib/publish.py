"""Putting a trained model in service: only at the end of a run, atomically, and never one worse than the current.

A run trains into `<name>.candidate.pt`; a killed or stopped run therefore leaves the model in service untouched.
At its end the candidate and the current model segment the same validation images; the candidate replaces the
current one when its Dice is at least as high (or the client forces it). The replaced model stays as
`<name>.prev.pt`, and `rollback` swaps the two back.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from textdiff.data.studies import Case
from textdiff.evaluation import dice_on_cases
from textdiff.model.segmenter import TextDiffModel, load_checkpoint

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


def publish_if_better(model: TextDiffModel, current: Path, cases: list[Case], device: str, force: bool) -> dict:
    """Compare the trained `model` (saved at `candidate_path(current)`) with the model in service on `cases` and
    publish it when it is not worse, or when `force`; returns what was decided and both scores."""
    volume_slices = model.cfg.train.volume_slices  # both models are judged on the slices this run trained on
    new = dice_on_cases(model, cases, volume_slices)
    old = current_dice(current, cases, device, model.cfg.head.label_names, volume_slices)
    published = force or old is None or new >= old
    decision = {"published": published, "validation_dice": round(new, 4),
                "current_validation_dice": None if old is None else round(old, 4),
                "compared_on": [case.id for case in cases], "forced": bool(force)}
    if published:
        replace(candidate_path(current), current)
        logger.info("published the new model (validation Dice %.4f, the previous one %s)", new,
                    "none" if old is None else f"{old:.4f}")
    else:
        logger.warning("kept the model in service: its validation Dice %.4f beats the new one's %.4f (the new one "
                       "stays in %s; train with force=true to publish it anyway)", old, new, candidate_path(current))
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
