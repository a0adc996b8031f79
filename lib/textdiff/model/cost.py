"""What a backbone costs, said before a user waits on it: parameters, feature channels per scale, the feature
cache's size a window and the seconds of features for a 256² image on the device in use (docs/backbones.md)."""

from __future__ import annotations

import logging
import time

import torch

from textdiff import sources
from textdiff.config import BackboneConfig
from textdiff.data.tiling import resolve_tiling, window_counts
from textdiff.model.backbone import DiffusionFeatureExtractor, make_extractor

logger = logging.getLogger(__name__)


def check_backbone(source: str, what: str = "backbone", device: str = "cpu") -> None:
    """Stop early, with the reason, on a backbone that cannot be read (a missing folder or file, a weights file that
    is not a guided-diffusion checkpoint), and say in the log what it will cost. A hub id is left to its first use:
    checking it would download it."""
    if source.startswith(sources.HUB_PREFIX):
        return
    if not sources.is_checkpoint_file(source):
        sources.resolve(source, what)
    extractor = make_extractor(resolve_tiling(BackboneConfig(), source), weights=source).to(device)
    logger.info("%s %s: %s", what, source, describe_cost(measure_cost(extractor)))


def measure_cost(extractor: DiffusionFeatureExtractor, image_size: int = 256, repeats: int = 1) -> dict:
    """Parameters, feature channels per scale and the seconds of features (every noise step) for one backbone pass
    and for an `image_size`² image read in its windows, on the extractor's device (after one warm-up pass)."""
    cfg = extractor.cfg
    window = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=extractor.noise.device)
    shapes = extractor.feature_shapes  # its dry run (once per extractor) is also the warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        extractor(window)
        if window.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    rows, cols = window_counts((image_size, image_size), cfg)
    every_part = extractor.latent if extractor.latent is not None else extractor.unet  # autoencoder, text encoder
    return {"parameters_m": sum(p.numel() for p in every_part.parameters()) / 1e6, "window": cfg.image_size,
            "timesteps": list(cfg.timesteps), "feature_channels": extractor.feature_channels,
            "cached_mb_per_window": sum(2 * c * h * w for c, h, w in shapes) / 2**20,
            "windows_per_image": rows * cols,
            "seconds_per_window": min(seconds), "seconds_per_image": min(seconds) * rows * cols,
            "device": str(window.device), "threads": torch.get_num_threads()}


def describe_cost(cost: dict) -> str:
    return (f"{cost['parameters_m']:.1f} M parameters, {cost['window']}² windows ({cost['windows_per_image']} for a "
            f"256² image), feature channels per scale {cost['feature_channels']} ({len(cost['timesteps'])} noise "
            f"steps, {cost['cached_mb_per_window']:.0f} MB a window in the feature cache), "
            f"{cost['seconds_per_image']:.2f} s of features a 256² image on {cost['device']}")
