"""Dice and IoU of a model's masks against labeled images, each judged at its own resolution.

Masks come the way `textdiff.inference` makes them (the same windows and way back), from items already loaded, so a
training run can score its validation images from the feature cache."""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from textdiff.data.items import Item
from textdiff.data.studies import Case, DataError, is_blank
from textdiff.inference import apply, grid_logits, post_transforms
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel

def segment_items(model: TextDiffModel, items: list[Item], cache: FeatureCache | None = None,
                  progress: bool = False) -> list[torch.Tensor]:
    """One (1, H, W) label map per item (as `TextDiffModel.load` gives), at the item's original size."""
    cache = cache or FeatureCache(model.extractor, enabled=False)
    return [torch.zeros(1, *item["original_shape"], dtype=torch.uint8) if is_blank(item["original_image"])
            else label_map(grid_logits(model, item, cache), item["original_shape"])
            for item in tqdm(items, desc="segment", unit="img", disable=not progress)]


def label_map(logits: torch.Tensor, original_shape: tuple[int, ...]) -> torch.Tensor:
    """(classes, *grid) logits of one plane -> (1, *original_shape) uint8, by `textdiff.inference.post_transforms`."""
    return apply(post_transforms(original_shape), {"pred": logits})["pred"].as_subclass(torch.Tensor)


def score_cases(model: TextDiffModel, cases: list[Case], progress: bool = False) -> dict:
    """Dice and IoU per labeled case: a 2D image as itself, a volume over all its voxels (as a 3D mask is judged,
    not slice by slice), and their means."""
    masks, truths = [], []
    for case in tqdm(cases, desc="evaluate", unit="img", disable=not progress):
        items = model.load_planes(case)
        predicted = segment_items(model, items)
        if len(items) > 1:
            predicted = [torch.stack(predicted, dim=-1)]
            items = [{"id": case.id, "original_label": torch.stack([i["original_label"] for i in items], dim=-1)}]
        masks += predicted
        truths += items
    return score_masks(masks, truths, model.cfg.head.num_classes)


def score_masks(masks: list[torch.Tensor], items: list[Item], num_classes: int) -> dict:
    """Foreground Dice and IoU per image and their means, and Dice per foreground class ("class_dice"); an empty
    mask predicted empty scores 1."""
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    iou_metric = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
    rows = []
    for mask, item in zip(masks, items):
        if item.get("original_label") is None:
            raise DataError(f"image '{item['id']}' has no mask to evaluate against")
        pred = one_hot(mask[None].long(), num_classes)
        truth = one_hot(item["original_label"][None].long(), num_classes)
        dice = dice_metric(pred, truth)[0]
        rows.append({"image": item["id"], "dice": dice.nanmean().item(), "iou": iou_metric(pred, truth).nanmean().item(),
                     "class_dice": dice.tolist()})
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("dice", "iou")} if rows else {}
    if rows:
        mean["class_dice"] = torch.tensor([r["class_dice"] for r in rows]).nanmean(dim=0).tolist()
    return {"mean": mean, "images": rows}


def dice_on_cases(model: TextDiffModel, cases: list[Case], volume_slices: str = "all") -> float:
    """Mean foreground Dice of the model's masks on labeled cases, at their own size (a volume's slices count, those
    `volume_slices` picks as `TextDiffModel.load_planes` does)."""
    items = [item for case in cases for item in model.load_planes(case, volume_slices)]
    return score_masks(segment_items(model, items), items, model.cfg.head.num_classes)["mean"]["dice"]
