"""One path for an image to segment, as MONAI writes it: `pre_transforms`, an `inferer`, `post_transforms`.

    pre:   read the file (MONAI's LoadImage, channel first, meta data kept), then each plane (a 2D image, or each
           slice of a volume) scaled to [-1, 1] on its own and put on the working grid, as in training
    infer: each plane in windows (MONAI's SlidingWindowInferer, Gaussian blending), the report beside every window;
           a blank plane is background without a backbone pass
    post:  logits back to the image's own in-plane size (as MONAI Label's Restored), softmax, the class per pixel

The app's infer task returns these three lists to MONAI Label; `textdiff predict` and `segment_image` run them here.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from monai.inferers import Inferer
from monai.transforms import Activationsd, AsDiscreted, CastToTyped, MapTransform, Resized
from tqdm.auto import tqdm

from textdiff.config import BackboneConfig
from textdiff.cpu import native_bfloat16
from textdiff.data.items import Item
from textdiff.data.studies import DataError, is_blank, plane_on_grid, read_image
from textdiff.data.tiling import describe, sliding_logits
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import TextDiffModel, predict_logits
from textdiff.progress import VolumeProgress

logger = logging.getLogger(__name__)


class ReadImaged(MapTransform):
    """A path becomes the image, channel first with its meta data (`read_image`: MONAI's LoadImage behind the
    reader's size limits, a DataError naming a file no reader takes); a tensor is taken as already read."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_image(Path(d[key]), key) if isinstance(d[key], (str, Path)) else d[key]
        return d


class PlanesOnGridd(MapTransform):
    """(C, X, Y) or (C, X, Y, Z) -> the same on the working grid, each plane as `plane_on_grid` reads it in training.
    Singleton axes go (a one-slice NIfTI is a 2D image); `blank` marks planes of one value, `original_shape` keeps
    the in-plane size for the way back."""

    def __init__(self, keys, backbone: BackboneConfig):
        super().__init__(keys)
        self.backbone = backbone

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()
            if image.dim() not in (3, 4):
                raise DataError(f"expected a 2D image or 3D volume, got spatial shape {tuple(image.shape[1:])}")
            while image.dim() > 3 and 1 in image.shape[1:]:
                image = image.squeeze(image.shape[1:].index(1) + 1)
            planes = [image] if image.dim() == 3 else list(image.unbind(-1))
            d["blank"] = [is_blank(plane) for plane in planes]
            d["original_shape"] = tuple(planes[0].shape[1:])
            logger.info("%s", describe(d["original_shape"], self.backbone))
            grids = [plane_on_grid(plane, self.backbone) for plane in planes]
            d[key] = grids[0] if image.dim() == 3 else torch.stack(grids, dim=-1)
        return d


def pre_transforms(backbone: BackboneConfig) -> list:
    return [ReadImaged("image"), PlanesOnGridd("image", backbone)]


class ReportInferer(Inferer):
    """(1, C, *grid[, Z]) -> (1, classes, *grid[, Z]) logits of a TextDiff model reading `report` beside each window.

    `fast` reads in bfloat16 where the CPU computes it natively (`serving_precision`), and a volume's slices in windows
    side by side (4 windows a 256² slice instead of 9: a 100-slice volume in half the time, the same Dice on MRI
    validation slices; docs/results/speed.md, "Volumes"). A 2D image keeps the model's overlap. A volume's slices are
    read as many at a time as the backbone reads images (`side_by_side`: two on the CPU; docs/results/speed.md, "Two
    images at a time").
    """

    def __init__(self, report: str, blank: list[bool], fast: bool = True, progress: bool = False):
        super().__init__()
        self.report, self.blank, self.fast, self.progress = report, blank, fast, progress

    def __call__(self, inputs: torch.Tensor, network: TextDiffModel, *args, **kwargs) -> torch.Tensor:
        planes = [inputs[0]] if inputs.dim() == 4 else list(inputs[0].unbind(-1))
        overlap = 0.0 if self.fast and len(planes) > 1 else None
        log, lock = VolumeProgress(len(planes)), threading.Lock()
        bar = tqdm(total=len(planes), desc="slices", unit="slice", disable=not self.progress or len(planes) == 1)

        def read(z: int) -> torch.Tensor:
            with torch.no_grad(), serving_precision(network, self.fast):  # both are per thread
                item = Item(id=f"slice{z}", image=planes[z], report=self.report)
                cache = FeatureCache(network.extractor, enabled=False)
                logits = background(network, planes[z]) if self.blank[z] else grid_logits(network, item, cache, overlap)
            with lock:
                log.step(self.blank[z])
                bar.update()
            return logits

        readers = network.extractor.side_by_side(len(planes))
        if readers > 1:
            network.text_encoder([self.report])  # encoded once, before the readers share its cache
            with ThreadPoolExecutor(readers, thread_name_prefix="slice-reader") as pool:
                logits = list(pool.map(read, range(len(planes))))
        else:
            logits = [read(z) for z in range(len(planes))]
        bar.close()
        return (logits[0] if inputs.dim() == 4 else torch.stack(logits, dim=-1))[None]


def background(model: TextDiffModel, plane: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(model.cfg.head.num_classes, *plane.shape[1:])
    logits[0] = 1.0
    return logits


def grid_logits(model: TextDiffModel, item: Item, cache: FeatureCache, overlap: float | None = None) -> torch.Tensor:
    """(classes, *grid) logits on an item's working grid: its one window, or sliding windows blended (overlapping
    as the model was trained to read, unless `overlap` says otherwise)."""
    overlap = model.cfg.backbone.window_overlap if overlap is None else overlap
    return sliding_logits(item, model.image_size, overlap, lambda windows: predict_logits(model, windows, cache))


def post_transforms(original_shape: tuple[int, ...], planes: int = 1) -> list:
    """Logits (classes, *grid[, Z]) -> the class per pixel, (1, *original_shape[, Z]) uint8."""
    size, mode = ((*original_shape, -1), "trilinear") if planes > 1 else (original_shape, "bilinear")
    return [Resized("pred", spatial_size=size, mode=mode), Activationsd("pred", softmax=True),
            AsDiscreted("pred", argmax=True), CastToTyped("pred", dtype=torch.uint8)]


def apply(transforms: list, data: dict) -> dict:
    """The transforms in turn; unlike `Compose`, a DataError stays a DataError (a 4xx in the app, one line in the CLI)."""
    for transform in transforms:
        data = transform(data)
    return data


def segment(model: TextDiffModel, data: dict, fast: bool = True, progress: bool = False) -> dict:
    """`data` ("image": a file path or a channel-first tensor, "report") with "pred", its label map."""
    data = apply(pre_transforms(model.cfg.backbone), data)
    inferer = ReportInferer(data.get("report", ""), data["blank"], fast, progress)
    data["pred"] = inferer(torch.as_tensor(data["image"])[None], model)[0]
    return apply(post_transforms(data["original_shape"], len(data["blank"])), data)


def segment_image(model: TextDiffModel, image: torch.Tensor, report: str, progress: bool = False,
                  fast: bool = True) -> torch.Tensor:
    """Label map (1, *spatial) of a channel-first 2D image or 3D volume at its own shape (`segment`)."""
    pred = segment(model, {"image": image, "report": report}, fast, progress)["pred"]
    return pred.as_subclass(torch.Tensor).reshape(1, *image.shape[1:])


def serving_precision(model: TextDiffModel, enabled: bool = True):
    """bfloat16 autocast on a CPU that computes it natively: about 1.3x faster segmentation, the same masks to within
    a few pixels in ten thousand (docs/results/speed.md). Only the interactive path (`segment`) uses it; evaluation
    and benchmarks read in float32, so their numbers do not depend on the CPU."""
    on_cpu = next(model.head.parameters()).device.type == "cpu"
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled and on_cpu and native_bfloat16())
