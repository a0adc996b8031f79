"""Feature cache and feature-level augmentation.

The backbone is frozen and its noise fixed, so an image's features never change: they are computed once (batched,
stored as fp16 in memory and optionally on disk) and reused every epoch. Flips and 90-degree rotations are applied to
the cached feature maps and the mask together, with MONAI's dictionary transforms (one random draw for all keys).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from monai.transforms import Compose, RandFlipd, RandRotate90d
from tqdm.auto import tqdm

from .backbone import DiffusionFeatureExtractor

AUGMENTATIONS = ("none", "flip", "rot90_flip")


def feature_keys(count: int) -> list[str]:
    return [f"feature{i}" for i in range(count)]


def feature_augmentation(mode: str, count: int, seed: int) -> Compose:
    """Random flips (and 90-degree rotations) applied identically to every feature map and the mask."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got '{mode}'")
    keys = [*feature_keys(count), "label"]
    transforms = []
    if mode in ("flip", "rot90_flip"):
        transforms += [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)]
    if mode == "rot90_flip":
        transforms.append(RandRotate90d(keys, prob=0.75, max_k=3))
    return Compose(transforms).set_random_state(seed=seed)


def backbone_fingerprint(extractor: DiffusionFeatureExtractor) -> str:
    """Hash of the backbone weights and read-out settings: disk-cached features are reused only if it matches."""
    digest = hashlib.sha1(json.dumps([extractor.cfg.timesteps, extractor.cfg.feature_layers, extractor.cfg.noise_seed]).encode())
    for name, tensor in sorted(extractor.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """id -> per-scale fp16 feature maps; `enabled=False` recomputes every time (for timing the cache's worth)."""

    def __init__(self, extractor: DiffusionFeatureExtractor, enabled: bool = True, folder: str | Path | None = None,
                 batch_size: int = 8):
        self.extractor = extractor
        self.enabled = enabled
        self.batch_size = batch_size
        self.folder = Path(folder) if folder else None
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._fingerprint = backbone_fingerprint(extractor) if self.folder else ""

    def _disk_path(self, key: str) -> Path:
        return self.folder / self._fingerprint / f"{key}.pt"

    def _compute(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        device = self.extractor.noise.device
        # Plain tensors: MONAI's MetaTensor would ride along into the cache and not load back with weights_only.
        features = self.extractor(images.as_subclass(torch.Tensor).to(device))
        return [[f[i].half().cpu() for f in features] for i in range(images.shape[0])]

    def _store(self, key: str, features: list[torch.Tensor]) -> None:
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
            self._memory[key] = torch.load(self._disk_path(key), weights_only=True)
            return self._memory[key]
        return None

    def fill(self, items: list[dict], progress: bool = True) -> None:
        """Compute the features of all items not cached yet, in batches."""
        if not self.enabled:
            return
        missing = [item for item in items if self._lookup(item["id"]) is None]
        bar = tqdm(total=len(missing), desc="diffusion features", unit="img", disable=not progress or not missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for item, features in zip(chunk, self._compute(torch.stack([it["image"] for it in chunk]))):
                self._store(item["id"], features)
            bar.update(len(chunk))
        bar.close()

    def get(self, item: dict) -> list[torch.Tensor]:
        cached = self._lookup(item["id"]) if self.enabled else None
        if cached is None:
            cached = self._compute(item["image"][None])[0]
            if self.enabled:
                self._store(item["id"], cached)
        return cached
