"""CDM: a class-conditional diffusion model trained with image-level labels only (Hu et al., MICCAI 2023).

The model is a diffusers UNet2DModel with a class embedding added to its time embedding; the label is never dropped
in training. It can start from a pretrained (unconditional) backbone, with the class embedding initialised to zero,
so it begins as that denoiser and only has to learn what the classes change. Masks are read out in `cdm_masks`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from textdiff.model.backbone import build_scheduler, build_unet, load_diffusion
from textdiff.config import BackboneConfig, CDMConfig
from textdiff.data.studies import Case, DataError, preprocess_image, read_2d
from textdiff.training.pretrain import PretrainSettings, fit_denoiser

logger = logging.getLogger(__name__)

CONFIG_FILE = "cdm.json"
# Reports that state the absence of findings ("No pulmonary infection.", "Normal chest radiograph.").
NORMAL_REPORT = re.compile(r"^\s*(no|normal)\b", re.IGNORECASE)


def image_level_label(case: Case, cfg: CDMConfig) -> str | None:
    """The image's class: its own label when it has one, else read from its report, else None (unknown).

    A report that starts with "No ..." or "Normal ..." is the healthy class; any other report is the abnormal class
    when there is only one (with several abnormal classes, a report cannot say which: label the images).
    """
    if case.image_label:
        return case.image_label
    if not case.report:
        return None
    if NORMAL_REPORT.match(case.report):
        return cfg.healthy_class
    abnormal = [c for c in cfg.classes if c != cfg.healthy_class]
    return abnormal[0] if len(abnormal) == 1 else None


class ClassMixEmbedding(torch.nn.Embedding):
    """The UNet's class embedding, also accepting (B, K) class weights: a weighted sum of class embeddings.

    The CDM map needs the condition tau * e(abnormal) + (1 - tau) * e(healthy), which is the embedding of the class
    weights (tau, 1 - tau). Same parameter name as nn.Embedding, so saved models stay plain diffusers models.
    """

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.is_floating_point():
            return labels.to(self.weight.dtype) @ self.weight
        return super().forward(labels)


def _mixable(unet: UNet2DModel) -> UNet2DModel:
    table = unet.class_embedding
    mix = ClassMixEmbedding(table.num_embeddings, table.embedding_dim)
    mix.weight = table.weight
    unet.class_embedding = mix
    return unet


def conditional_unet(classes: int, arch: BackboneConfig, init: str | None = None) -> tuple[UNet2DModel, DDPMScheduler]:
    """A class-conditional UNet: from `init` (a diffusers folder; zero class embeddings), else fresh from `arch`."""
    base, scheduler = load_diffusion(init) if init else (build_unet(arch), build_scheduler(arch))
    if base.config.num_class_embeds == classes:
        return _mixable(base), scheduler
    config = {k: v for k, v in base.config.items() if k != "_use_default_values"}  # else diffusers resets them
    unet = UNet2DModel.from_config({**config, "num_class_embeds": classes, "class_embed_type": None})
    missing, unexpected = unet.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not name.startswith("class_embedding") for name in missing):
        raise DataError(f"'{init}' does not fit a class-conditional UNet: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(unet.class_embedding.weight)
    return _mixable(unet), scheduler


def labeled_images(cases: list[Case], cfg: CDMConfig, size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a known image-level class, preprocessed to [-1, 1], and their class indices."""
    images, labels, unknown = [], [], set()
    for case in cases:
        label = image_level_label(case, cfg)
        if label is None:
            continue
        if label not in cfg.classes:
            unknown.add(label)
            continue
        images.append(preprocess_image(read_2d(case.image, "image"), size, channels))
        labels.append(cfg.classes.index(label))
    if unknown:
        raise DataError(f"image-level label(s) {sorted(unknown)} are not CDM classes {list(cfg.classes)}")
    present = {cfg.classes[i] for i in labels}
    if cfg.healthy_class not in present or len(present) < 2:
        raise DataError(f"the CDM needs images of the healthy class '{cfg.healthy_class}' and of an abnormal class; "
                        f"the image-level labels found are {sorted(present) or 'none'} (label column of reports.csv, "
                        "or reports such as 'No pulmonary infection.')")
    return torch.stack(images), torch.tensor(labels)


def train_cdm(cases: list[Case], out: str | Path, cfg: CDMConfig, settings: PretrainSettings,
              arch: BackboneConfig | None = None, init: str | None = None, progress: bool = True,
              maps_folder: str | Path | None = None) -> list[dict]:
    """Train the CDM on every case with an image-level label; writes a diffusers folder plus cdm.json into `out`.

    `init` a CDM folder continues that run (its epochs count on); `maps_folder` gets the maps of a few training
    images at each save (`cdm_progress.MapProgress`).
    """
    from textdiff.weak.cdm_progress import MapProgress  # it reads maps from a CDM, so it imports this module

    unet, scheduler = conditional_unet(len(cfg.classes), arch or BackboneConfig(), init)
    images, labels = labeled_images(cases, cfg, unet.config.sample_size, unet.config.in_channels)
    counts = {name: int((labels == i).sum()) for i, name in enumerate(cfg.classes)}
    logger.info("training the CDM on %d images with image-level labels: %s", len(labels), counts)
    previous = Path(init or "") / "history.json"
    if init and (Path(init) / CONFIG_FILE).is_file() and previous.is_file():
        settings = dataclasses.replace(settings, history=json.loads(previous.read_text()))
        logger.info("continuing the CDM of '%s' after its epoch %d", init, len(settings.history))
    extra = {CONFIG_FILE: json.dumps(dataclasses.asdict(cfg), indent=1)}
    on_save = MapProgress(cases, cfg, maps_folder).bind(unet, scheduler) if maps_folder else None
    return fit_denoiser(unet, scheduler, images, {"class_labels": labels}, Path(out), settings, progress, extra,
                        on_save=on_save)


class CDM(torch.nn.Module):
    """A trained class-conditional UNet, its noise schedule and the mask read-out settings."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, cfg: CDMConfig):
        super().__init__()
        if unet.config.num_class_embeds != len(cfg.classes):
            raise DataError(f"the UNet has {unet.config.num_class_embeds} class embeddings, the config "
                             f"{len(cfg.classes)} classes {list(cfg.classes)}")
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.cfg = cfg
        self.image_size = unet.config.sample_size
        self.in_channels = unet.config.in_channels
        generator = torch.Generator().manual_seed(cfg.noise_seed)
        self.register_buffer("noise", torch.randn(1, self.in_channels, self.image_size, self.image_size,
                                                  generator=generator))

    def class_weights(self, name: str) -> torch.Tensor:
        if name not in self.cfg.classes:
            raise DataError(f"'{name}' is not a CDM class: the classes are {list(self.cfg.classes)}")
        return F.one_hot(torch.tensor(self.cfg.classes.index(name)), len(self.cfg.classes)).float()


def save_readout(folder: str | Path, settings: dict) -> CDMConfig:
    """Write read-out settings (noise_level, smooth, threshold, ...) into a CDM's config, atomically: what
    `load_cdm` reads from then on."""
    path = Path(folder) / CONFIG_FILE
    cfg = CDMConfig.from_dict({**json.loads(path.read_text()), **settings})
    staging = path.with_name(f".{CONFIG_FILE}.tmp")
    staging.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    os.replace(staging, path)
    return cfg


def load_cdm(folder: str | Path, device: str | torch.device = "cpu", **overrides) -> CDM:
    """A CDM written by `train_cdm`; `overrides` change read-out settings (tau, noise_level, threshold, ...)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' is not a CDM: it has no {CONFIG_FILE} (train one with `textdiff cdm-train`)")
    cfg = CDMConfig.from_dict({**json.loads(path.read_text()), **overrides})
    unet, scheduler = load_diffusion(str(folder))
    return CDM(_mixable(unet), scheduler, cfg).to(device)
