"""TextDiff as one object: frozen backbone + frozen text encoder + trained head, and its checkpoint format.

A checkpoint holds only the trained head and the config that rebuilds the frozen parts; it is written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from textdiff.model.backbone import DiffusionFeatureExtractor, make_extractor
from textdiff.config import TextDiffConfig
from textdiff.data.items import Item
from textdiff.data.studies import (Case, DataError, check_drawn_in_slices, check_mask, load_case, plane_on_grid,
                                   read_planes, slices_to_train, with_mask)
from textdiff.model.fusion import TextDiffHead
from textdiff.model.report_supervision import obey_reports
from textdiff.model.text import TextEncoder
from textdiff.data.tiling import resolve_tiling
from textdiff.model.features import FeatureCache

logger = logging.getLogger(__name__)


class TextDiffModel(torch.nn.Module):
    def __init__(self, cfg: TextDiffConfig, extractor: DiffusionFeatureExtractor | None = None,
                 text_encoder: TextEncoder | None = None):
        super().__init__()
        self.extractor = extractor or make_extractor(cfg.backbone)
        read = dataclasses.replace(cfg.backbone, **self.extractor.architecture,
                                   feature_layers=self.extractor.cfg.feature_layers)
        backbone = resolve_tiling(read, cfg.backbone.pretrained)
        self.cfg = dataclasses.replace(cfg, backbone=backbone)
        self.text_encoder = text_encoder or TextEncoder(cfg.text)
        self.head = TextDiffHead(self.extractor.feature_channels, self.text_encoder.dim, cfg.head, backbone.image_size)

    @property
    def image_size(self) -> int:
        return self.cfg.backbone.image_size

    def load(self, case: Case) -> Item:
        """A case as this model reads it: image and mask on their working grid (`textdiff.data.tiling`), report."""
        backbone = self.cfg.backbone
        return load_case(case, backbone.image_size, backbone.in_channels, self.cfg.head.num_classes, backbone)

    def load_planes(self, case: Case, volume_slices: str = "all") -> list[Item]:
        """A case as items: `load` for a 2D image, one item per slice (with its mask slice) for a volume; which slices
        of a labeled volume, `volume_slices` says (`train.volume_slices`: "all", "labeled" or "auto")."""
        planes = read_planes(case.image, "image")
        if len(planes) == 1:
            return [self.load(case)]
        masks = read_planes(case.label, "mask") if case.label is not None else [None] * len(planes)
        if len(masks) != len(planes):
            raise DataError(f"mask '{case.label}' has {len(masks)} slices but its image has {len(planes)}")
        if case.label is not None and volume_slices != "all":
            check_drawn_in_slices(masks, case.label)
            volume_slices = slices_to_train(masks, volume_slices)
        items = []
        for z, (plane, mask) in enumerate(zip(planes, masks)):
            if volume_slices == "labeled" and mask is not None and not mask.any():
                continue  # an empty slice of a volume drawn in a few slices: not drawn, not background
            item = {**self.plane_item(plane, f"{case.id}#z{z}", case.report), "original_image": plane,
                    "label": None, "original_label": None}
            if mask is not None:
                mask = check_mask(mask, tuple(plane.shape[1:]), self.cfg.head.num_classes, case.label)
                item = with_mask(item, mask, self.cfg.backbone)
            items.append(item)
        if case.label is not None and volume_slices == "labeled":
            logger.info("volume '%s' is drawn in a few slices: its %d labeled slices of %d train, the others are left "
                        "out (train.volume_slices=all trains them as background)", case.id, len(items), len(planes))
        return items

    def plane_item(self, plane: torch.Tensor, key: str, report: str) -> Item:
        """One channel-first 2D plane (an image, or a slice of a volume) as this model reads it, without a mask."""
        return {"id": key, "image": plane_on_grid(plane, self.cfg.backbone, f"image '{key}'"), "report": report,
                "original_shape": tuple(plane.shape[1:])}

    def features(self, images: torch.Tensor, reports: list[str] | None = None) -> list[torch.Tensor]:
        return self.extractor(images, reports)

    def logits_from_features(self, features: list[torch.Tensor], reports: list[str],
                             boxes: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits of a batch of windows; `boxes` say where windows of larger images lie (None: whole images)."""
        device = features[0].device
        # channels-last: the head's convolutions and its tokens (channels innermost) run a CPU step in 3/4 of the time
        features = [f.to(torch.float32, memory_format=torch.channels_last) for f in features]
        if self.cfg.head.use_text:
            tokens, mask = self.text_encoder(reports)
            logits = self.head(features, tokens.to(device), mask.to(device), boxes)
        else:
            logits = self.head(features, boxes=boxes)
        if not self.cfg.head.obey_report or self.training:
            # outside training, so the loss never meets a mask the rule forbids (a wrong report, a flipped image)
            return logits
        if boxes and any(box is not None for box in boxes):
            raise DataError("head.obey_report reads a report's sides on whole images: set backbone.max_windows=1 "
                             "so each image is one window")
        return obey_reports(logits, reports)

    def forward(self, images: torch.Tensor, reports: list[str]) -> torch.Tensor:
        """Logits of whole images already at the backbone's input size (one window each)."""
        return self.logits_from_features(self.features(images, reports), reports)

    def trainable_parameters(self):
        return self.head.parameters()


@torch.no_grad()
def predict_logits(model: TextDiffModel, items: list[Item], cache: FeatureCache, batch_size: int = 8) -> torch.Tensor:
    """Logits at window resolution for labeled or unlabeled window items (whole images or windows), in order."""
    model.eval()
    device = next(model.head.parameters()).device
    outputs = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        # float16 as cached, widened before stacking (CPU autocast has no float16 stack)
        features = [torch.stack([f.float() for f in scale]).to(device)
                    for scale in zip(*cache.get_many(chunk))]
        outputs.append(model.logits_from_features(features, [item["report"] for item in chunk],
                                                  [item.get("box") for item in chunk]).float().cpu())
    return torch.cat(outputs)


def save_checkpoint(model: TextDiffModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write head weights + config atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.to_dict()
    backbone = cfg["backbone"]["pretrained"]
    if backbone and Path(backbone).resolve().is_relative_to(path.parent.resolve()):
        cfg["backbone"]["pretrained"] = os.path.relpath(Path(backbone).resolve(), path.parent.resolve())
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config": cfg, "head": model.head.state_dict(), **(extra or {})}, tmp)
    os.replace(tmp, path)
    return path


def _read_checkpoint(path: str | Path) -> tuple[dict, TextDiffConfig]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TextDiff checkpoint at '{path}': train one with `textdiff train`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # a head saved before head.per_scale_entry existed concatenated its scales
    state["config"].setdefault("head", {}).setdefault("per_scale_entry", False)
    cfg = TextDiffConfig.from_dict(state["config"])
    backbone = cfg.backbone.pretrained
    if backbone and not Path(backbone).is_absolute() and (path.parent / backbone).exists():
        cfg.backbone.pretrained = str((path.parent / backbone).resolve())
    return state, cfg


def load_checkpoint_config(path: str | Path) -> TextDiffConfig:
    """The config a checkpoint was trained with, its backbone path resolved (no weights are built)."""
    return _read_checkpoint(path)[1]


def read_head_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained head's weights of a checkpoint (to start another run from them)."""
    return _read_checkpoint(path)[0]["head"]


def record_seen_images(path: str | Path, ids: set[str]) -> None:
    """Note in a checkpoint the images its run read (masks, reports, validation), atomically: a later run then knows
    which labels are new to this model (`textdiff.training.comparison`)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({**state, "seen_images": sorted(ids)}, tmp)
    os.replace(tmp, path)


def seen_images(path: str | Path) -> set[str] | None:
    """The images a checkpoint's run read; None when it records none (or there is no checkpoint)."""
    if not Path(path).is_file():
        return None
    seen = _read_checkpoint(path)[0].get("seen_images")
    return None if seen is None else set(seen)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TextDiffModel:
    """Rebuild the whole model from a head checkpoint (the backbone path may be relative to the checkpoint)."""
    state, cfg = _read_checkpoint(path)
    model = TextDiffModel(cfg)
    model.head.load_state_dict(state["head"])
    return model.to(device).eval()
