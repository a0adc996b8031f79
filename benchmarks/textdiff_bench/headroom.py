"""How much a report could add to a model's masks: the "area oracle".

An LViT-style report names sides, zones and how many areas are infected, never an outline. So the only mistakes it
can correct are whole areas: a true area the mask misses entirely, or a drawn area that touches no true one. The area
oracle fixes exactly those (adds each missed area from the truth, erases each false one) and keeps every boundary as
the model drew it. Its Dice, less the model's, bounds what any use of such a report can add to that model's masks.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from textdiff.evaluation import score_masks


def fix_whole_areas(mask: torch.Tensor, truth: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int, int, int]:
    """The label map with missed areas added and false areas erased, per foreground class, and the counts of
    (true areas, missed areas, false areas). An area is a connected region of one class."""
    predicted, target = np.asarray(mask), np.asarray(truth)
    if predicted.shape != target.shape:
        raise ValueError(f"mask {predicted.shape} and truth {target.shape} differ in shape")
    fixed = predicted.copy()
    areas = missed = false = 0
    for label in range(1, num_classes):
        drawn, true = predicted == label, target == label
        true_areas, count = ndimage.label(true)
        areas += count
        for index in range(1, count + 1):
            area = true_areas == index
            if not drawn[area].any():
                missed += 1
                fixed[area] = label
        drawn_areas, count = ndimage.label(drawn)
        for index in range(1, count + 1):
            area = drawn_areas == index
            if not true[area].any():
                false += 1
                fixed[area & (fixed == label)] = 0  # not what an earlier class's fix added
    return torch.as_tensor(fixed), areas, missed, false


def area_oracle(masks: list[torch.Tensor], items: list[dict], num_classes: int) -> dict:
    """Dice of the area oracle per image and on average, with the whole-area errors it fixed."""
    fixed, areas, missed, false = [], 0, 0, 0
    for mask, item in zip(masks, items):
        oracle, n_areas, n_missed, n_false = fix_whole_areas(mask, item["original_label"], num_classes)
        fixed.append(oracle)
        areas, missed, false = areas + n_areas, missed + n_missed, false + n_false
    scores = score_masks(fixed, items, num_classes)
    return {"dice": scores["mean"]["dice"], "areas": areas, "missed_areas": missed, "false_areas": false,
            "per_image_dice": {row["image"]: round(row["dice"], 4) for row in scores["images"]}}
