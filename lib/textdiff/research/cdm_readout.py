"""The CDM's read-out (noise level Q, smoothing, threshold, largest component) chosen on training images with masks
only, so a benchmark's test images never pick the settings they are scored with."""

from __future__ import annotations

import dataclasses
import itertools

import torch
from tqdm.auto import tqdm

from textdiff.data.studies import Case, load_case
from textdiff.training.inference import score_masks
from textdiff.weak.cdm import image_level_label, load_cdm
from textdiff.weak.cdm_masks import condition_maps, smoothed, threshold_map

READOUT_GRID = {"noise_level": (100, 200, 400, 500), "smooth": (0.0, 2.0, 4.0), "threshold": (None, 0.5, 0.7),
                "largest_component": (False, True)}


def choose_readout(folder: str, cases: list[Case], device, grid: dict = READOUT_GRID, limit: int = 24,
                   base: dict | None = None) -> tuple[dict, list[dict]]:
    """(the read-out settings with the highest mean Dice on up to `limit` abnormal `cases` with a mask, every
    setting's row). A threshold of None is Otsu's. The maps are computed once per noise level; levels whose DDIM
    steps would not be evenly spaced (`cdm.ddim_steps`) are left out."""
    probe = load_cdm(folder, device, **(base or {}))
    chosen = [c for c in cases if c.label is not None
              and image_level_label(c, probe.cfg) not in (None, probe.cfg.healthy_class)][:limit]
    if not chosen:
        raise ValueError("choosing the CDM read-out needs abnormal training images with a mask")
    items = [load_case(c, probe.image_size, probe.in_channels, 2) for c in chosen]
    rows, steps = [], probe.cfg.ddim_steps
    total = probe.scheduler.config.num_train_timesteps
    for level in [q for q in grid["noise_level"] if q < total and q % steps == 0 and total % (q // steps) == 0]:
        cdm = load_cdm(folder, device, **{**(base or {}), "noise_level": level})
        raw = torch.cat([condition_maps(cdm, item["image"][None].to(device), image_level_label(case, cdm.cfg),
                                        normalise=False).cpu()
                         for case, item in tqdm(list(zip(chosen, items)), desc=f"read-out Q={level}", unit="img")])
        for sigma, threshold, largest in itertools.product(grid["smooth"], grid["threshold"], grid["largest_component"]):
            cfg = dataclasses.replace(cdm.cfg, smooth=sigma, threshold=threshold, largest_component=largest)
            masks = [threshold_map(soft, cfg) for soft in smoothed(raw, sigma)]
            dice = score_masks(masks, [{**i, "original_label": i["label"]} for i in items], 2)["mean"]["dice"]
            rows.append({"noise_level": level, "smooth": sigma, "threshold": threshold, "largest_component": largest,
                         "dice": dice})
            print(f"read-out Q={level} smooth={sigma:g} threshold={threshold or 'Otsu'} largest component={largest}: "
                  f"training Dice {dice:.4f}", flush=True)
    best = max(rows, key=lambda row: row["dice"])
    return {key: best[key] for key in grid}, rows
