"""The CDM's read-out (noise level Q, smoothing, clipping, threshold, largest component) chosen on images with a
drawn mask: the app does it with the final masks at the end of a CDM run, a benchmark with its training images only
(so the test images never pick the settings they are scored with)."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import torch
from tqdm.auto import tqdm

from textdiff.data.studies import Case, DataError, load_case
from textdiff.evaluation import score_masks
from textdiff.weak.cdm import image_level_label, load_cdm
from textdiff.weak.cdm_masks import condition_maps, smoothed, threshold_map

logger = logging.getLogger(__name__)

READOUT_GRID = {"noise_level": (100, 200, 400, 500), "smooth": (0.0, 2.0, 4.0, 8.0), "clip": (0.0, 1.0),
                "threshold": (None, 0.3, 0.5, 0.7), "largest_component": (False, True)}


def choose_readout(folder: str, cases: list[Case], device, grid: dict = READOUT_GRID, limit: int = 24,
                   base: dict | None = None, minimum: int = 1, progress: bool = True) -> tuple[dict, list[dict]]:
    """(the read-out settings with the highest mean Dice on up to `limit` abnormal `cases` with a mask, every
    setting's row). A threshold of None is Otsu's. The maps are computed once per noise level; levels whose DDIM
    steps would not be evenly spaced (`cdm.ddim_steps`) are left out. DataError with fewer than `minimum` images."""
    probe = load_cdm(folder, device, **(base or {}))
    chosen = [c for c in cases if c.label is not None
              and image_level_label(c, probe.cfg) not in (None, probe.cfg.healthy_class)][:limit]
    if len(chosen) < max(1, minimum):
        raise DataError(f"choosing the CDM read-out needs {max(1, minimum)} or more abnormal images with a mask; "
                        f"there are {len(chosen)}")
    items = [load_case(c, probe.image_size, probe.in_channels, 2) for c in chosen]
    rows, steps = [], probe.cfg.ddim_steps
    total = probe.scheduler.config.num_train_timesteps
    for level in [q for q in grid["noise_level"] if q < total and q % steps == 0 and total % (q // steps) == 0]:
        cdm = load_cdm(folder, device, **{**(base or {}), "noise_level": level})
        raw = torch.cat([condition_maps(cdm, item["image"][None].to(device), image_level_label(case, cdm.cfg),
                                        normalise=False).cpu()
                         for case, item in tqdm(list(zip(chosen, items)), desc=f"read-out Q={level}", unit="img",
                                                disable=not progress)])
        for sigma, clip, threshold, largest in itertools.product(grid["smooth"], grid["clip"], grid["threshold"],
                                                                 grid["largest_component"]):
            cfg = dataclasses.replace(cdm.cfg, smooth=sigma, clip=clip, threshold=threshold, largest_component=largest)
            masks = [threshold_map(soft, cfg) for soft in smoothed(raw, sigma, clip)]
            dice = score_masks(masks, [{**i, "original_label": i["label"]} for i in items], 2)["mean"]["dice"]
            rows.append({"noise_level": level, "smooth": sigma, "clip": clip, "threshold": threshold,
                         "largest_component": largest, "dice": dice})
            logger.debug("read-out Q=%d smooth=%g clip=%g threshold=%s largest component=%s: Dice %.4f", level, sigma,
                         clip, threshold or "Otsu", largest, dice)
    best = max(rows, key=lambda row: row["dice"])
    logger.info("CDM read-out chosen on %d images with a mask: %s (Dice %.4f; the defaults' %.4f)", len(chosen),
                {key: best[key] for key in grid}, best["dice"], _defaults_dice(rows, probe.cfg))
    return {key: best[key] for key in grid}, rows


def _defaults_dice(rows: list[dict], cfg) -> float:
    """The Dice of the config's own read-out among the rows (nan when the grid does not hold it)."""
    same = [row["dice"] for row in rows if all(row[key] == getattr(cfg, key) for key in READOUT_GRID)]
    return same[0] if same else float("nan")
