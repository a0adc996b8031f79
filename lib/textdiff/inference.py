"""Segmentation at the image's own resolution, and Dice / IoU evaluation against its masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot
from tqdm.auto import tqdm

from .data import DataError, preprocess_image
from .features import FeatureCache
from .model import TextDiffModel
from .train import predict_logits


def to_original_size(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Upsample (C, h, w) logits to the image's own size and take the class per pixel: (1, H, W) uint8."""
    full = F.interpolate(logits[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
    return full.argmax(0, keepdim=True).to(torch.uint8)


def segment_items(model: TextDiffModel, items: list[dict], cache: FeatureCache | None = None,
                  batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """One (1, H, W) label map per item, at the item's original size."""
    cache = cache or FeatureCache(model.extractor, enabled=False)
    masks = []
    for start in tqdm(range(0, len(items), batch_size), desc="segment", disable=not progress):
        chunk = items[start : start + batch_size]
        logits = predict_logits(model, chunk, cache, batch_size)
        masks += [to_original_size(lg, item["original_shape"]) for lg, item in zip(logits, chunk)]
    return masks


def score_masks(masks: list[torch.Tensor], items: list[dict], num_classes: int) -> dict:
    """Foreground Dice and IoU per image and their means; an empty mask predicted empty scores 1."""
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    iou_metric = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
    rows = []
    for mask, item in zip(masks, items):
        if item.get("original_label") is None:
            raise ValueError(f"image '{item['id']}' has no mask to evaluate against")
        pred = one_hot(mask[None].long(), num_classes)
        truth = one_hot(item["original_label"][None].long(), num_classes)
        rows.append({
            "image": item["id"],
            "dice": dice_metric(pred, truth).nanmean().item(),
            "iou": iou_metric(pred, truth).nanmean().item(),
        })
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("dice", "iou")} if rows else {}
    return {"mean": mean, "images": rows}


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


@torch.no_grad()
def segment_image(model: TextDiffModel, image: torch.Tensor, report: str, batch_size: int = 8) -> torch.Tensor:
    """Label map (1, *spatial) for a channel-first 2D image or 3D volume (slice by slice), at the image's own size."""
    device = next(model.head.parameters()).device
    model.eval()

    def predict(batch: torch.Tensor, shape: tuple[int, int]) -> list[torch.Tensor]:
        logits = model(batch.to(device), [report] * len(batch)).cpu()
        return [to_original_size(lg, shape)[0] for lg in logits]

    return per_slice(image, model.image_size, model.cfg.backbone.in_channels, predict, batch_size)
