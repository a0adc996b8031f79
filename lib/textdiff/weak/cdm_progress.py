"""What a long CDM run shows while it trains: at each save, the maps of a few training images and, where they have a
drawn mask, the Dice of the masks read from those maps. A run of thousands of steps can then be judged (and stopped)
by its maps, not by its denoising loss, which hardly moves once the images are learned."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from textdiff.config import CDMConfig
from textdiff.data.studies import Case, load_case
from textdiff.plots import plot_map_examples
from textdiff.evaluation import score_masks
from textdiff.weak.cdm import CDM, image_level_label
from textdiff.weak.cdm_masks import condition_maps, threshold_map

logger = logging.getLogger(__name__)


class MapProgress:
    """`fit_denoiser`'s `on_save` for a CDM: writes `<folder>/epoch-NNNN.png` and logs the maps' Dice.

    It shows up to `count` abnormal training images, those with a drawn mask first (images never seen by any test).
    """

    def __init__(self, cases: list[Case], cfg: CDMConfig, folder: str | Path, count: int = 4):
        abnormal = [c for c in cases if image_level_label(c, cfg) not in (None, cfg.healthy_class)]
        self.cases = sorted(abnormal, key=lambda c: c.label is None)[:count]
        self.cfg, self.folder = cfg, Path(folder)
        self.unet, self.scheduler, self.items = None, None, []

    def bind(self, unet, scheduler) -> "MapProgress":
        """The model being trained (its weights are the saved EMA weights whenever this is called)."""
        self.unet, self.scheduler = unet, scheduler
        size, channels = unet.config.sample_size, unet.config.in_channels
        self.items = [load_case(case, size, channels, 2) for case in self.cases]
        return self

    def __call__(self, epoch: int) -> None:
        if not self.items:
            return
        device = next(self.unet.parameters()).device
        cdm = CDM(self.unet, self.scheduler, self.cfg).to(device)
        try:
            rows = [self._row(cdm, case, item) for case, item in zip(self.cases, self.items)]
        finally:
            self.unet.requires_grad_(True)  # CDM() froze the weights being trained
        self.folder.mkdir(parents=True, exist_ok=True)
        path = plot_map_examples([row for row, _ in rows], self.folder / f"epoch-{epoch:04d}.png")
        drawn = [(mask, item) for (_, mask), item in zip(rows, self.items) if item["label"] is not None]
        if drawn:
            dice = score_masks([m for m, _ in drawn], [{**i, "original_label": i["label"]} for _, i in drawn], 2)
            logger.info("epoch %d: CDM masks of %d training images, Dice %.4f; maps in %s", epoch, len(drawn),
                        dice["mean"]["dice"], path)
        else:
            logger.info("epoch %d: CDM maps of %d training images in %s", epoch, len(rows), path)

    def _row(self, cdm: CDM, case: Case, item: dict) -> tuple[dict, torch.Tensor]:
        device = cdm.noise.device
        soft = condition_maps(cdm, item["image"][None].to(device), image_level_label(case, self.cfg))[0].cpu()
        truth = item["label"] if item["label"] is not None else torch.zeros(1, *soft.shape)
        return {"image": item["image"], "truth": truth, "maps": {"CDM map": soft}}, threshold_map(soft, self.cfg)
