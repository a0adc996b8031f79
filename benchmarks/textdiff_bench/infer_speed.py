"""`textdiff-bench infer-speed`: seconds per image and per volume of a trained model's inference, and the Dice it gives,
for each reading asked for (float32 or the fast path of `segment_image`; window overlaps; images read at a time on
the CPU, `textdiff.model.backbone.SIDE_BY_SIDE`).

Every reading segments the same labeled images (2D studies folders) with `segment_image` (the app infer task's
pre_transforms, inferer and post_transforms, `textdiff.inference`), one image at a time after one warm-up; a volume (any NIfTI, resampled to `volume_shape`) is segmented
whole, as `POST /infer/textdiff` does with a volume. Prints one table and writes it as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from textdiff.data.studies import DataError, read_2d, read_image, read_studies
from textdiff.model import backbone
from textdiff.model.segmenter import TextDiffModel, load_checkpoint
from textdiff.evaluation import score_masks
from textdiff.cpu import native_bfloat16
from textdiff.inference import segment_image


@dataclass
class Reading:
    fast: bool
    overlap: float
    side_by_side: int = backbone.SIDE_BY_SIDE

    @property
    def name(self) -> str:
        return f"{'fast' if self.fast else 'float32'}, overlap {self.overlap:g}, {self.side_by_side} at a time"


def _channel_first(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.ndim == 3 else tensor[None]


def _images(folders: list[Path]) -> tuple[list[torch.Tensor], list[str], list[dict]]:
    cases = [case for folder in folders for case in read_studies(folder) if case.label is not None]
    if folders and not cases:
        raise DataError(f"no labeled images in {', '.join(map(str, folders))}")
    images = [_channel_first(read_2d(case.image, "image")) for case in cases]
    truths = [{"id": case.id, "original_label": _channel_first(read_2d(case.label, "mask")).long()} for case in cases]
    return images, [case.report for case in cases], truths


def volume_of(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """A (1, X, Y, Z) volume resampled (trilinear) to `shape`."""
    volume = read_image(path, "volume").as_subclass(torch.Tensor).float()
    if volume.ndim != 4:
        raise DataError(f"'{path}' is not a 3D volume (shape {tuple(volume.shape)})")
    return F.interpolate(volume[None], size=shape, mode="trilinear", align_corners=False)[0]


def _timed_masks(model: TextDiffModel, images: list[torch.Tensor], reports: list[str], fast: bool):
    segment_image(model, images[0], reports[0], fast=fast)  # warm-up: first-call allocations are not the reading's
    start = time.perf_counter()
    masks = [segment_image(model, image, report, fast=fast) for image, report in zip(images, reports)]
    return masks, (time.perf_counter() - start) / len(images)


def run_infer_speed(checkpoint: Path, folders: list[Path], readings: list[Reading], volume: Path | None = None,
                    volume_shape: tuple[int, int, int] = (256, 256, 100), out: Path | None = None) -> list[dict]:
    model = load_checkpoint(checkpoint)
    images, reports, truths = _images(folders)
    stack = volume_of(volume, volume_shape) if volume else None
    rows, reference, chosen = [], None, backbone.SIDE_BY_SIDE
    try:
        for reading in readings:
            backbone.SIDE_BY_SIDE = reading.side_by_side
            row, reference = _reading_row(model, reading, images, reports, truths, stack, volume_shape, reference)
            rows.append(row)
            print(_line(row), flush=True)
    finally:
        backbone.SIDE_BY_SIDE = chosen
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(checkpoint), "rows": rows}, indent=1))
    return rows


def _reading_row(model: TextDiffModel, reading: Reading, images: list[torch.Tensor], reports: list[str],
                 truths: list[dict], stack: torch.Tensor | None, volume_shape: tuple[int, int, int],
                 reference: list[torch.Tensor] | None) -> tuple[dict, list[torch.Tensor] | None]:
    """One reading's row (seconds, Dice, pixels changed against the first reading's masks, the volume's seconds)."""
    model.cfg = dataclasses.replace(model.cfg, backbone=dataclasses.replace(model.cfg.backbone,
                                                                            window_overlap=reading.overlap))
    row = {"reading": reading.name, "side_by_side": reading.side_by_side, "threads": torch.get_num_threads(),
           "native_bfloat16": native_bfloat16()}
    if images:
        masks, seconds = _timed_masks(model, images, reports, reading.fast)
        row.update(images=len(images), seconds_per_image=seconds,
                   dice=score_masks(masks, truths, model.cfg.head.num_classes)["mean"]["dice"])
        reference = reference or masks
        row["pixels_changed"] = sum(float((m != r).float().mean()) for m, r in zip(masks, reference)) / len(masks)
    if stack is not None:
        start = time.perf_counter()
        segment_image(model, stack, "", fast=reading.fast)
        row.update(volume_shape=list(volume_shape), volume_seconds=time.perf_counter() - start)
    return row, reference


def _line(row: dict) -> str:
    parts = [f"{row['reading']:<22}"]
    if "dice" in row:
        parts.append(f"{row['seconds_per_image']:.3f} s an image, Dice {row['dice']:.4f} "
                     f"({row['pixels_changed']:.2%} of pixels differ from the first reading)")
    if "volume_seconds" in row:
        parts.append(f"volume {'x'.join(map(str, row['volume_shape']))}: {row['volume_seconds']:.1f} s")
    return " | ".join(parts)
