"""Feature cache and feature-level augmentation.

The backbone is frozen and its noise fixed, so an image's features never change: they are computed once (batched,
stored as fp16 in memory and optionally on disk) and reused every epoch. Flips and 90-degree rotations are applied to
the cached feature maps and the mask together, with MONAI's dictionary transforms (one random draw for all keys).
"mirror" is the one flip that keeps a report true: left-right, with the report's sides swapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from monai.transforms import Compose, Flipd, RandFlipd, RandomizableTransform, RandRotate90d
from tqdm.auto import tqdm

from textdiff.errors import DataError
from textdiff.errors import FeaturesTooLarge
from textdiff.model.backbone import DiffusionFeatureExtractor

logger = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "mirror", "flip", "rot90_flip")
# Images are loaded (C, X, Y): the first spatial axis runs across the patient, from one side to the other.
LEFT_RIGHT_AXIS = 0
_SIDES = {"left": "right", "right": "left"}


def feature_keys(count: int, prefix: str = "feature") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def mirror_report(report: str) -> str:
    """The report of the left-right mirrored image: every 'left' becomes 'right' and back, keeping the case."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = _SIDES[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return re.sub(r"\b(left|right)\b", swap, report, flags=re.IGNORECASE)


class RandMirrord(RandomizableTransform):
    """With probability `prob`, flip the feature maps and mask left-right and swap the sides named in "report"."""

    def __init__(self, keys: list[str], prob: float = 0.5):
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=LEFT_RIGHT_AXIS, allow_missing_keys=True)

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        mirrored = self.flip(dict(data))
        mirrored["report"] = mirror_report(data["report"])
        if data.get("box") is not None:  # a window of a larger image lands on the other side of the mirrored image
            first, last = data["box"][LEFT_RIGHT_AXIS], data["box"][LEFT_RIGHT_AXIS + 2]
            mirrored["box"] = data["box"].clone()
            mirrored["box"][LEFT_RIGHT_AXIS], mirrored["box"][LEFT_RIGHT_AXIS + 2] = -last, -first
        return mirrored


def feature_augmentation(mode: str, count: int, seed: int) -> Compose:
    """Random flips (and 90-degree rotations) applied identically to every feature map, the mask, a synthetic
    copy's feature maps ("synthetic0", ... when present) and an "image" when present (the benchmark's UNet trains on
    images); "mirror" also rewrites the sample's "report"."""
    if mode not in AUGMENTATIONS:
        raise DataError(f"augment must be one of {AUGMENTATIONS}, got '{mode}'")
    keys = [*feature_keys(count), *feature_keys(count, "synthetic"), "label", "image"]
    transforms = [RandMirrord(keys)] if mode == "mirror" else []
    if mode in ("flip", "rot90_flip"):
        transforms += [RandFlipd(keys, prob=0.5, spatial_axis=axis, allow_missing_keys=True) for axis in (0, 1)]
    if mode == "rot90_flip":
        transforms.append(RandRotate90d(keys, prob=0.75, max_k=3, allow_missing_keys=True))
    return Compose(transforms).set_random_state(seed=seed)


def backbone_fingerprint(extractor: DiffusionFeatureExtractor) -> str:
    """Hash of the backbone weights and read-out settings: disk-cached features are reused only if it matches."""
    digest = hashlib.sha1(json.dumps([extractor.cfg.timesteps, extractor.cfg.feature_layers, extractor.cfg.noise_seed]).encode())
    weights = extractor.latent if extractor.latent is not None else extractor.unet  # a latent model: all its parts
    for name, tensor in sorted(weights.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """id -> per-scale fp16 feature maps; `enabled=False` recomputes every time (for timing the cache's worth).

    Memory is bounded by `max_memory_gb`: a large backbone's features (about 140 MB a window for the 256x256
    ImageNet model) would otherwise exhaust it. Past the bound, features are kept on disk only (with a `folder`) and
    read back at each use, or refused with a message that says what to change (without one).
    """

    def __init__(self, extractor: DiffusionFeatureExtractor, enabled: bool = True, folder: str | Path | None = None,
                 batch_size: int = 8, max_memory_gb: float = 8.0):
        self.extractor = extractor
        self.enabled = enabled
        self.batch_size = batch_size
        self.folder = Path(folder) if folder else None
        self.max_memory_gb = max_memory_gb
        self.in_memory = True
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._fingerprint = backbone_fingerprint(extractor) if self.folder else ""

    def _disk_path(self, key: str) -> Path:
        return self.folder / self._fingerprint / f"{key}.pt"

    def _key(self, item: dict) -> str:
        """An image's id; with its report's hash when the backbone reads the report (the features depend on it)."""
        if not self.extractor.text_conditioned:
            return item["id"]
        return f"{item['id']}~{hashlib.sha1(item.get('report', '').encode()).hexdigest()[:12]}"

    def _compute(self, images: torch.Tensor, reports: list[str]) -> list[list[torch.Tensor]]:
        device = self.extractor.noise.device
        # Plain tensors: MONAI's MetaTensor would ride along into the cache and not load back with weights_only.
        features = self.extractor(images.as_subclass(torch.Tensor).to(device), reports)
        return [[f[i].half().cpu() for f in features] for i in range(images.shape[0])]

    def _store(self, key: str, features: list[torch.Tensor]) -> None:
        if self.in_memory:
            self._memory[key] = features
        if self.folder:
            path = self._disk_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(features, tmp)
            os.replace(tmp, path)

    def _lookup(self, key: str) -> list[torch.Tensor] | None:
        if key in self._memory:
            return self._memory[key]
        if self.folder and self._disk_path(key).exists():
            features = torch.load(self._disk_path(key), weights_only=True)
            if self.in_memory:
                self._memory[key] = features
            return features
        return None

    def _check_memory(self, windows: int, window_bytes: int) -> None:
        """Before caching `windows` windows: keep them in memory within the bound, else on disk, else refuse."""
        needed = (windows + len(self._memory)) * window_bytes / 2**30
        if needed <= self.max_memory_gb or not self.in_memory:
            return
        if self.folder is None:
            raise FeaturesTooLarge(
                f"the diffusion features of {windows + len(self._memory)} windows take {needed:.1f} GB, over the "
                f"feature cache's limit of {self.max_memory_gb:g} GB: raise it (train.max_feature_cache_gb; the app's "
                "--conf max_feature_cache_gb) if the memory is there, or train on fewer or smaller images")
        logger.warning("the diffusion features of %d windows take %.1f GB, over the feature cache's limit of %g GB: "
                       "kept on disk in %s and read back at each use (slower)", windows + len(self._memory), needed,
                       self.max_memory_gb, self.folder)
        self.in_memory = False
        self._memory.clear()

    def fill(self, items: list[dict], progress: bool = True) -> None:
        """Compute the features of all items not cached yet, in batches."""
        if not self.enabled:
            return
        missing = [item for item in items if self._lookup(self._key(item)) is None]
        bar = tqdm(total=len(missing), desc="diffusion features", unit="img", disable=not progress or not missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            computed = self._compute(torch.stack([it["image"] for it in chunk]), [it.get("report", "") for it in chunk])
            if start == 0:
                self._check_memory(len(missing), sum(2 * f.numel() for f in computed[0]))
            for item, features in zip(chunk, computed):
                self._store(self._key(item), features)
            bar.update(len(chunk))
        bar.close()

    def get(self, item: dict) -> list[torch.Tensor]:
        return self.get_many([item])[0]

    def get_many(self, items: list[dict]) -> list[list[torch.Tensor]]:
        """Each item's features; those not cached are computed in one backbone call (its passes side by side)."""
        found = [self._lookup(self._key(item)) if self.enabled else None for item in items]
        missing = [i for i, features in enumerate(found) if features is None]
        if missing:
            computed = self._compute(torch.stack([items[i]["image"] for i in missing]),
                                     [items[i].get("report", "") for i in missing])
            for i, features in zip(missing, computed):
                found[i] = features
                if self.enabled:
                    self._store(self._key(items[i]), features)
        return found
