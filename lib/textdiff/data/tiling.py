"""How an image of any size meets the backbone's fixed image_size² input: a working grid, read in windows.

The image is scaled (aspect kept) onto a working grid (`working_shape`). A grid that fits one window is the papers'
resize; a larger one keeps fine detail and is read in image_size² windows: on a fixed lattice for training, so the
feature cache can key every window, and with MONAI's `SlidingWindowInferer` (overlap, Gaussian blending) for
inference. Each window knows where it lies in the image (`relative_box`), so a report's "upper left" still points to
the same place whatever window the model is looking at.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.transforms import Resize

from textdiff.data.items import Item
from textdiff.config import BackboneConfig

logger = logging.getLogger(__name__)

PAD_VALUE = -1.0  # images are in [-1, 1]: a grid smaller than a window is padded with black, labelled background
DEFAULT_MAX_WINDOWS = 4.0
TILING_FILE = "tiling.json"  # beside a pretrained backbone's weights: the scale it learned images at


def tiling_record(cfg: BackboneConfig) -> str:
    """What a pretrained backbone's folder records of how it read its images."""
    return json.dumps({"patch_scale": cfg.patch_scale, "max_windows": cfg.max_windows or DEFAULT_MAX_WINDOWS})


def resolve_tiling(cfg: BackboneConfig, source: str | None) -> BackboneConfig:
    """`cfg` with the scale settings it leaves open (None) taken from the backbone folder `source`, which learned
    images at that scale, else the defaults. A head then reads images as its backbone was taught to."""
    recorded = {}
    if source and (Path(source) / TILING_FILE).is_file():
        recorded = json.loads((Path(source) / TILING_FILE).read_text())
    scale = cfg.patch_scale if cfg.patch_scale is not None else recorded.get("patch_scale")
    windows = cfg.max_windows or recorded.get("max_windows") or DEFAULT_MAX_WINDOWS
    if recorded and (scale, windows) != (recorded.get("patch_scale"), recorded.get("max_windows")):
        logger.warning("backbone %s was pretrained with patch_scale %s, max_windows %s; reading images with %s, %s",
                       source, recorded.get("patch_scale"), recorded.get("max_windows"), scale, windows)
    return dataclasses.replace(cfg, patch_scale=scale, max_windows=windows)


def working_scale(shape: tuple[int, ...], cfg: BackboneConfig) -> float:
    """Working-grid pixels per image pixel: `cfg.patch_scale`, else picked from the image size (see the config)."""
    if cfg.patch_scale:
        return cfg.patch_scale
    longer = max(shape)
    if longer <= cfg.image_size:
        return cfg.image_size / longer
    return min(1.0, (cfg.max_windows or DEFAULT_MAX_WINDOWS) * cfg.image_size / longer)


def working_shape(shape: tuple[int, ...], cfg: BackboneConfig) -> tuple[int, int]:
    scale = working_scale(shape, cfg)
    return tuple(max(1, round(n * scale)) for n in shape)


def window_counts(shape: tuple[int, ...], cfg: BackboneConfig) -> tuple[int, int]:
    """How many windows, along each axis, an image of this shape is read in."""
    size = cfg.image_size
    return tuple(len(window_starts(n, size, _stride(size, cfg.window_overlap))) for n in working_shape(shape, cfg))


def describe(shape: tuple[int, ...], cfg: BackboneConfig) -> str:
    """One line for the log: how an image of this shape is read."""
    grid, size = working_shape(shape, cfg), cfg.image_size
    if max(grid) <= size:
        return f"{shape[0]}x{shape[1]} resized to {grid[0]}x{grid[1]}: one {size}x{size} window"
    counts = window_counts(shape, cfg)
    return (f"{shape[0]}x{shape[1]} read as patches at scale {working_scale(shape, cfg):.3g}: a {grid[0]}x{grid[1]} "
            f"grid, {counts[0]}x{counts[1]} windows of {size}x{size} (overlap {cfg.window_overlap:g})")


def to_working_grid(image: torch.Tensor, cfg: BackboneConfig, nearest: bool = False) -> torch.Tensor:
    """A channel-first 2D image (or label, `nearest`) resampled onto its working grid."""
    shape = working_shape(tuple(image.shape[1:]), cfg)
    if tuple(image.shape[1:]) == shape:
        return torch.as_tensor(image)
    resize = Resize(shape, mode="nearest") if nearest else Resize(shape, mode="bilinear", anti_aliasing=True)
    return torch.as_tensor(resize(image))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis, `stride` apart, the last one flush with the end (0 alone when it fits)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def _stride(window: int, overlap: float) -> int:
    return max(1, int(window * (1 - overlap)))


def relative_box(start: tuple[int, int], window: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Where a window lies in its grid: (first, last) pixel centre per axis in [-1, 1], as (a0, b0, a1, b1)."""
    first = [-1 + 2 * s / max(n - 1, 1) for s, n in zip(start, shape)]
    last = [-1 + 2 * (s + window - 1) / max(n - 1, 1) for s, n in zip(start, shape)]
    return torch.tensor([*first, *last], dtype=torch.float32)


def crop(tensor: torch.Tensor, start: tuple[int, int], window: int, value: float) -> torch.Tensor:
    """The window² crop of a channel-first 2D tensor at `start`, padded with `value` where the grid is smaller."""
    part = tensor[:, start[0] : start[0] + window, start[1] : start[1] + window]
    short = [window - part.shape[1], window - part.shape[2]]
    if short == [0, 0]:
        return part
    return F.pad(part[None].float(), (0, short[1], 0, short[0]), value=value)[0].to(part.dtype)


def window_items(item: Item, window: int, overlap: float = 0.5) -> list[Item]:
    """The training windows of an item on its working grid: the item itself when its grid is one window, else
    window² crops of image and label on a lattice `overlap` apart, each with its own cache id and `box`."""
    grid = tuple(item["image"].shape[1:])
    if grid == (window, window):
        return [item]
    stride = _stride(window, overlap)
    windows = []
    for x in window_starts(grid[0], window, stride):
        for y in window_starts(grid[1], window, stride):
            label = item.get("label")
            windows.append({**item, "id": window_id(item["id"], grid, (x, y)), "source": item["id"],
                            "image": crop(item["image"], (x, y), window, PAD_VALUE),
                            "label": None if label is None else crop(label, (x, y), window, 0),
                            "box": relative_box((x, y), window, grid)})
    return windows


def windows_of(items: list[Item], window: int) -> list[Item]:
    """Every training window of every item (`window_items`), in order."""
    return [part for item in items for part in window_items(item, window)]


def window_id(key: str, grid: tuple[int, ...], start: tuple[int, int]) -> str:
    """Cache id of a window: the image, its grid (which fixes the scale) and the window's place."""
    return f"{key}@{grid[0]}x{grid[1]}:{start[0]},{start[1]}"


def sliding_logits(item: Item, window: int, overlap: float, logits_of_windows) -> torch.Tensor:
    """(classes, *grid) logits of an item's working grid, blended from overlapping windows (Gaussian weights).

    `logits_of_windows(windows)` maps a list of window items (id, image, report, box) to (B, classes, window, window).
    A grid that is one window is that window alone, under the item's own id (as in training).
    """
    grid = tuple(item["image"].shape[1:])
    if grid == (window, window):
        return logits_of_windows([item])[0]

    def predictor(images: torch.Tensor, places: list) -> torch.Tensor:
        starts = [(place[2].start, place[3].start) for place in places]
        windows = [{**item, "id": window_id(item["id"], grid, s), "source": item["id"], "image": image,
                    "box": relative_box(s, window, grid)} for s, image in zip(starts, images)]
        return logits_of_windows(windows)

    # padded here at the far end, as `crop` pads training windows, so a window's id always means the same pixels
    padded = crop(item["image"], (0, 0), max(window, *grid), PAD_VALUE)[:, : max(window, grid[0]), : max(window, grid[1])]
    inferer = SlidingWindowInferer(roi_size=(window, window), sw_batch_size=8, overlap=overlap, mode="gaussian",
                                   with_coord=True)
    return inferer(padded[None].as_subclass(torch.Tensor), predictor)[0][:, : grid[0], : grid[1]]
