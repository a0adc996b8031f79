"""Masks nobody drew, and the gate that keeps them only where they help.

Pseudo-labels (e.g. the CDM's pre-annotations) and images labeled healthy (an empty mask) join the training split
only, so the checkpoint is still chosen on real masks; an image with a real mask never uses its pseudo-label. With
the gate (`compare_without`), a run that uses pseudo-labels or synthetic copies also trains without them on the same
split from the same initial weights, and whichever scores the higher validation Dice is kept. With too few labels
to hold any out (about 8), both last rounds are scored on the training images, which both learned; the gate says so
(`compared_on`), and publishing is still judged on images the new model did not train on
(`textdiff.training.comparison`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from textdiff.data.items import Item
from textdiff.data.studies import Case
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel
from textdiff.training.train import TrainResult, train_head

logger = logging.getLogger(__name__)


def healthy_cases(cases: list[Case], healthy_label: str | None) -> list[Case]:
    """The cases without a mask whose image-level label is `healthy_label` (none when it is None)."""
    return [c for c in cases if healthy_label and c.label is None and c.image_label == healthy_label]


def with_empty_mask(item: Item) -> Item:
    return {**item, "label": torch.zeros(1, *item["image"].shape[1:], dtype=torch.long)}


def without_real(real: set[str], pseudo_cases: list[Case], healthy: list[Case]) -> tuple[list[Case], list[Case]]:
    """The pseudo-labeled and healthy cases that may join a run whose real masks are of the `real` ids: a real mask
    wins over a pseudo-label, and either over a healthy label."""
    pseudo_cases = [c for c in pseudo_cases if c.label is not None and c.id not in real]
    return pseudo_cases, [c for c in healthy if c.id not in real and c.id not in {p.id for p in pseudo_cases}]


def extra_label_items(model: TextDiffModel, real_images: int, pseudo_cases: list[Case],
                      healthy: list[Case]) -> tuple[list[Item], list[Item]]:
    """The pseudo-labeled items and the healthy ones (empty masks), each marked with its `origin`."""
    pseudo = [{**item, "origin": "pseudo"} for c in pseudo_cases for item in model.load_planes(c)]
    empty = [{**with_empty_mask(item), "origin": "healthy"} for c in healthy for item in model.load_planes(c)]
    if pseudo_cases or healthy:
        logger.info("training on %d real, %d pseudo-labeled and %d healthy images", real_images, len(pseudo_cases),
                    len(healthy))
    return pseudo, empty


@dataclasses.dataclass
class PlainRun:
    """What the run without the extras trains on: the same split, the same initial head."""

    train: list[Item]  # real masks and healthy images: no pseudo-labels
    val: list[Item]
    unlabeled: list[Item]  # report supervision stays: it is not an extra
    initial: dict[str, torch.Tensor]


def keep_better(model: TextDiffModel, result: TrainResult, extras: list[str], plain: PlainRun, checkpoint: str | Path,
                cache: FeatureCache, progress: bool) -> tuple[TextDiffModel, TrainResult]:
    """Train the run again without `extras` and keep (in memory and in `checkpoint`) whichever scores the higher
    validation Dice; a tie keeps the plain run. `TrainResult.gate` says which, with both scores."""
    extras = " and ".join(extras)
    logger.info("training again without %s, to keep the better run", extras)
    checkpoint = Path(checkpoint)
    plain_path = checkpoint.with_name(f"{checkpoint.stem}.without-extras{checkpoint.suffix}")
    plain_model = TextDiffModel(model.cfg, model.extractor, model.text_encoder).to(next(model.head.parameters()).device)
    plain_model.head.load_state_dict(plain.initial)
    torch.manual_seed(model.cfg.train.seed)
    plain_cfg = dataclasses.replace(model.cfg.train, synthetic_ratio=0)
    plain_result = train_head(plain_model, plain.train, plain.val, plain_cfg, checkpoint=plain_path, cache=cache,
                              progress=progress, unlabeled=plain.unlabeled)
    keep_extras = result.best_dice > plain_result.best_dice
    gate = {"extras": extras, "kept": f"with {extras}" if keep_extras else f"without {extras}",
            "dice_with": round(result.best_dice, 4), "dice_without": round(plain_result.best_dice, 4),
            "compared_on": f"{result.judged_on} images"}
    logger.info("kept the run %s: Dice %.4f with them, %.4f without, on the %s images", gate["kept"],
                result.best_dice, plain_result.best_dice, result.judged_on)
    if result.judged_on == "training":
        logger.warning("nothing held out: the runs with and without %s were compared on the training images, which "
                       "both learned", extras)
    if keep_extras:
        plain_path.unlink(missing_ok=True)
        return model, dataclasses.replace(result, gate=gate)
    os.replace(plain_path, checkpoint)
    return plain_model, dataclasses.replace(plain_result, gate=gate)
