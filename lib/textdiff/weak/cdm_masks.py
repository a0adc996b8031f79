"""Masks from a CDM: how its denoising changes when the class condition is moved toward healthy.

From x_Q (the image noised to step Q with fixed noise), R deterministic DDIM steps (eta = 0) run twice in one batch:
once conditioned on e(abnormal), once on tau * e(abnormal) + (1 - tau) * e(healthy). The step-wise differences of
the two trajectories, summed and divided by (1 - tau), approximate the derivative of the denoising path with respect
to the condition; summed over channels and min-max normalised, that is the soft map, thresholded (Otsu) to a mask.
The reconstruction baseline denoises toward healthy from the same x_Q and takes |x - x_healthy|.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from monai.transforms import GaussianSmooth, KeepLargestConnectedComponent
from monai.utils import convert_to_tensor
from skimage.filters import threshold_otsu

from textdiff.config import CDMConfig
from textdiff.data.studies import Case, preprocess_image, read_image
from textdiff.errors import DataError
from textdiff.evaluation import score_masks
from textdiff.weak.cdm import CDM, image_level_label


def _ddim(cdm: CDM) -> tuple[DDIMScheduler, list[int]]:
    """A DDIM scheduler whose steps go from Q down to 0 in R equal strides, and those R timesteps."""
    cfg, total = cdm.cfg, cdm.scheduler.config.num_train_timesteps
    stride = cfg.noise_level // cfg.ddim_steps
    if not 0 < cfg.noise_level < total or total % stride:
        raise DataError(f"cdm.noise_level {cfg.noise_level} / cdm.ddim_steps {cfg.ddim_steps} = stride {stride} "
                         f"must divide the {total} training timesteps, with 0 < noise_level < {total}")
    ddim = DDIMScheduler.from_config(cdm.scheduler.config)
    ddim.set_timesteps(total // stride)
    return ddim, list(range(cfg.noise_level, 0, -stride))


def _noised(cdm: CDM, images: torch.Tensor) -> torch.Tensor:
    steps = torch.full((images.shape[0],), cdm.cfg.noise_level, dtype=torch.long, device=images.device)
    return cdm.scheduler.add_noise(images, cdm.noise.expand_as(images), steps)


@torch.no_grad()
def trajectories(cdm: CDM, images: torch.Tensor, conditions: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """DDIM trajectories from the same x_Q, one per condition ((B, K) class weights), run as one batch.

    Returns, per condition, the R intermediate samples (B, C, S, S).
    """
    ddim, timesteps = _ddim(cdm)
    batch = images.shape[0]
    sample = _noised(cdm, images).repeat(len(conditions), 1, 1, 1)
    labels = torch.cat(conditions).to(images.device)
    steps = [[] for _ in conditions]
    for t in timesteps:
        eps = cdm.unet(sample, t, class_labels=labels).sample
        sample = ddim.step(eps, t, sample, eta=0.0).prev_sample
        for index, part in enumerate(sample.split(batch)):
            steps[index].append(part)
    return steps


def _normalised(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (H, W) map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    span = high - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def condition_maps(cdm: CDM, images: torch.Tensor, abnormal: str, normalise: bool = True) -> torch.Tensor:
    """The CDM map (B, S, S) of images (B, C, S, S) in [-1, 1] for the abnormal class `abnormal`, smoothed by
    `cdm.smooth`, clipped (`cdm.clip`) and min-max normalised (`normalise` False: the raw derivative as it is).

    With tau = 1 both conditions are the same, the trajectories coincide and the map is zero.
    """
    cfg = cdm.cfg
    batch = images.shape[0]
    target = cdm.class_weights(abnormal)
    moved = cfg.tau * target + (1 - cfg.tau) * cdm.class_weights(cfg.healthy_class)
    first, second = trajectories(cdm, images, [target.expand(batch, -1), moved.expand(batch, -1)])
    difference = sum(a - b for a, b in zip(first, second)).sum(1)
    raw = difference / (1 - cfg.tau) if cfg.tau < 1 else torch.zeros_like(difference)
    return smoothed(raw, cfg.smooth, cfg.clip) if normalise else raw


def smoothed(raw: torch.Tensor, sigma: float, clip: float = 0.0) -> torch.Tensor:
    """Raw maps (B, S, S) blurred by a Gaussian of `sigma` pixels (0: not at all), each clipped to its `clip` and
    100 - `clip` percentiles (0: not at all), then min-max normalised. The derivative peaks at a few pixels of a
    region, and a few extreme pixels (often at the image border) would otherwise squash the rest toward 0."""
    if sigma > 0:
        # the batch as the channel axis: each map blurred on its own
        raw = convert_to_tensor(GaussianSmooth(sigma)(raw.float()), track_meta=False)
    if clip > 0:
        flat = raw.flatten(1).float()
        low, high = (torch.quantile(flat, q, dim=1)[:, None, None] for q in (clip / 100, 1 - clip / 100))
        raw = torch.minimum(torch.maximum(raw, low), high)
    return _normalised(raw)


def reconstruction_maps(cdm: CDM, images: torch.Tensor) -> torch.Tensor:
    """Baseline: |x - x_healthy| summed over channels, x_healthy denoised toward healthy from the same x_Q."""
    healthy = cdm.class_weights(cdm.cfg.healthy_class).expand(images.shape[0], -1)
    (steps,) = trajectories(cdm, images, [healthy])
    return _normalised((images - steps[-1]).abs().sum(1))


def threshold_map(soft: torch.Tensor | np.ndarray, cfg: CDMConfig) -> torch.Tensor:
    """(H, W) soft map in [0, 1] -> (1, H, W) uint8 mask: cfg.threshold, or Otsu; optionally the largest region."""
    soft = np.asarray(soft, dtype=np.float32)
    if soft.max() <= soft.min():
        return torch.zeros(1, *soft.shape, dtype=torch.uint8)
    level = cfg.threshold if cfg.threshold is not None else threshold_otsu(soft.ravel())
    mask = torch.as_tensor(soft > level, dtype=torch.uint8)[None]
    if cfg.largest_component and mask.any():
        mask = KeepLargestConnectedComponent(applied_labels=[1])(mask).to(torch.uint8)
    return mask


def to_size(maps: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps resized (bilinear) to an image's own (H, W)."""
    return F.interpolate(maps[:, None].float(), size=shape, mode="bilinear", align_corners=False)[:, 0]


def abnormal_class(cdm: CDM, image_label: str | None) -> str | None:
    """The class whose evidence the map shows: the image's own abnormal class, the only abnormal class when the label
    is unknown, None for a healthy image."""
    cfg = cdm.cfg
    if image_label == cfg.healthy_class:
        return None
    if image_label is not None:
        cdm.class_weights(image_label)  # an unknown class is a clear error
        return image_label
    abnormal = [c for c in cfg.classes if c != cfg.healthy_class]
    if len(abnormal) > 1:
        raise DataError(f"the CDM has several abnormal classes {abnormal}: say which one the image has")
    return abnormal[0]


@torch.no_grad()
def cdm_segment(cdm: CDM, image: torch.Tensor, image_label: str | None = None,
                batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (1, *spatial) uint8 and soft map (1, *spatial) float in [0, 1] for a 2D image or a volume (per slice).

    An image known to be healthy gets an empty mask and a zero map without running the model.
    """
    target = abnormal_class(cdm, image_label)
    if target is None:
        shape = (1, *image.shape[1:])
        return torch.zeros(shape, dtype=torch.uint8), torch.zeros(shape)
    device = cdm.noise.device

    def predict(batch: torch.Tensor, shape: tuple[int, int]) -> list[torch.Tensor]:
        return list(to_size(condition_maps(cdm, batch.to(device), target), shape).cpu())

    soft = per_slice(image, cdm.image_size, cdm.in_channels, predict, batch_size)
    return threshold_map(soft[0], cdm.cfg), soft


def dice_against_masks(cdm: CDM, cases: list[Case], limit: int = 50) -> dict:
    """How good the CDM's proposals are where someone drew the answer: mean foreground Dice (any label > 0) of its
    masks against the drawn masks of up to `limit` cases whose mask has foreground. {"dice": None, "images": 0} when
    there is no such case."""
    masks, items = [], []
    for case in cases:
        if case.label is None or len(items) == limit:
            continue
        truth = (torch.as_tensor(read_image(case.label, "mask")) > 0).to(torch.uint8)
        if not truth.any():
            continue
        mask, _ = cdm_segment(cdm, read_image(case.image, "image"), image_level_label(case, cdm.cfg))
        masks.append(mask.reshape(truth.shape))
        items.append({"id": case.id, "original_label": truth})
    if not items:
        return {"dice": None, "images": 0}
    return {"dice": round(score_masks(masks, items, 2)["mean"]["dice"], 4), "images": len(items)}


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
