"""Segmentation at the image's own resolution, and Dice / IoU evaluation against its masks."""

from __future__ import annotations

import functools
import logging
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from textdiff.data.studies import Case, DataError, is_blank, preprocess_image
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel
from textdiff.data.tiling import describe, sliding_logits
from textdiff.training.train import predict_logits

logger = logging.getLogger(__name__)


def to_original_size(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Upsample (C, h, w) logits to the image's own size and take the class per pixel: (1, H, W) uint8."""
    full = F.interpolate(logits[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
    return full.argmax(0, keepdim=True).to(torch.uint8)


def grid_logits(model: TextDiffModel, item: dict, cache: FeatureCache, overlap: float | None = None) -> torch.Tensor:
    """(classes, *grid) logits on an item's working grid: its one window, or sliding windows blended (overlapping
    as the model was trained to read, unless `overlap` says otherwise)."""
    overlap = model.cfg.backbone.window_overlap if overlap is None else overlap
    return sliding_logits(item, model.image_size, overlap, lambda windows: predict_logits(model, windows, cache))


def segment_items(model: TextDiffModel, items: list[dict], cache: FeatureCache | None = None,
                  progress: bool = False) -> list[torch.Tensor]:
    """One (1, H, W) label map per item (as `TextDiffModel.load` gives), at the item's original size."""
    cache = cache or FeatureCache(model.extractor, enabled=False)
    return [torch.zeros(1, *item["original_shape"], dtype=torch.uint8) if is_blank(item["original_image"])
            else to_original_size(grid_logits(model, item, cache), item["original_shape"])
            for item in tqdm(items, desc="segment", unit="img", disable=not progress)]


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


def score_masks(masks: list[torch.Tensor], items: list[dict], num_classes: int) -> dict:
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


def per_slice(image: torch.Tensor, size: int, channels: int, predict, batch_size: int = 8) -> torch.Tensor:
    """Apply a 2D model to a channel-first 2D image or 3D volume; returns (1, *spatial) at the image's own size.

    `predict` maps a batch of preprocessed slices (B, channels, size, size) to a list of (X, Y) outputs at the given
    original in-plane size. A volume (C, X, Y, Z) goes slice by slice along its last axis, in batches (one model pass
    per batch); singleton spatial axes (single-slice NIfTI/NRRD/DICOM) are kept, so the output has the image's shape.
    """
    spatial = tuple(image.shape[1:])
    if len(spatial) not in (2, 3):
        raise DataError(f"expected a 2D image or 3D volume, got spatial shape {spatial}")
    volume = torch.as_tensor(image).float()
    volume = volume if len(spatial) == 3 else volume[..., None]
    outputs = []
    for start in range(0, volume.shape[-1], batch_size):
        batch = torch.stack([preprocess_image(volume[..., z], size, channels)
                             for z in range(start, min(start + batch_size, volume.shape[-1]))])
        outputs += predict(batch.as_subclass(torch.Tensor), tuple(volume.shape[1:3]))
    return torch.stack(outputs, dim=-1).reshape(1, *spatial)


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere bfloat16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def serving_precision(model: TextDiffModel, enabled: bool = True):
    """bfloat16 autocast on a CPU that computes it natively: about 1.3x faster segmentation, the same masks to within
    a few pixels in ten thousand (docs/results/speed.md). Only the interactive path (`segment_image`) uses it;
    evaluation and benchmarks read in float32, so their numbers do not depend on the CPU."""
    on_cpu = next(model.head.parameters()).device.type == "cpu"
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and on_cpu and native_bfloat16())


@torch.no_grad()
def segment_image(model: TextDiffModel, image: torch.Tensor, report: str, progress: bool = False,
                  fast: bool = True) -> torch.Tensor:
    """Label map (1, *spatial) for a channel-first 2D image or 3D volume (slice by slice, with a progress bar when
    asked and a progress line in the log), at the image's own size; a blank slice is background without a backbone
    pass. `fast` reads in bfloat16 where the CPU computes it natively (`serving_precision`), and a volume's slices in
    windows side by side (4 windows a 256² slice instead of 9: a 100-slice volume in half the time, the same Dice on
    MRI validation slices; docs/results/speed.md, "Volumes"). A 2D image keeps the model's overlap."""
    spatial = tuple(image.shape[1:])
    if len(spatial) not in (2, 3):
        raise DataError(f"expected a 2D image or 3D volume, got spatial shape {spatial}")
    volume = torch.as_tensor(image).float()
    volume = volume if len(spatial) == 3 else volume[..., None]
    cache = FeatureCache(model.extractor, enabled=False)
    logger.info("%s", describe(tuple(volume.shape[1:3]), model.cfg.backbone))
    slices = volume.shape[-1]
    overlap = 0.0 if fast and slices > 1 else None
    log = VolumeProgress(slices)
    masks = []
    with serving_precision(model, fast):
        for z in tqdm(range(slices), desc="slices", unit="slice", disable=not progress or slices == 1):
            plane = volume[..., z]
            blank = is_blank(plane)
            if blank:
                masks.append(torch.zeros(plane.shape[1:], dtype=torch.uint8))
            else:
                item = model.plane_item(plane, f"slice{z}", report)
                masks.append(to_original_size(grid_logits(model, item, cache, overlap), item["original_shape"])[0])
            log.step(blank)
    return torch.stack(masks, dim=-1).reshape(1, *spatial)


class VolumeProgress:
    """A line in the log every `every` seconds while a volume is segmented: slices done, blank ones, time left."""

    def __init__(self, slices: int, every: float = 10.0):
        self.slices, self.every, self.done, self.blank = slices, every, 0, 0
        self.start = self.last = time.perf_counter()

    def step(self, blank: bool) -> None:
        self.done += 1
        self.blank += blank
        now = time.perf_counter()
        if self.slices > 1 and (now - self.last >= self.every or self.done == self.slices):
            self.last = now
            left = (now - self.start) / self.done * (self.slices - self.done)
            logger.info("segmented %d/%d slices (%d blank, skipped) in %.0f s, about %.0f s left",
                        self.done, self.slices, self.blank, now - self.start, left)
