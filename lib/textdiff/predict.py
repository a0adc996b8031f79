"""Write predicted masks next to nothing else: a mask file with the image's geometry, and a PNG overlay to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImage
from PIL import Image
from scipy import ndimage

OVERLAY_COLOURS = np.array([[0, 0, 0], [255, 60, 60], [60, 200, 255], [255, 210, 0], [120, 255, 120]], np.uint8)


def mask_extension(image_path: Path) -> str:
    name = image_path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else (".png" if name.endswith((".jpg", ".jpeg")) else image_path.suffix)


def save_mask(mask: torch.Tensor, image: MetaTensor, out_dir: Path, name: str, ext: str) -> Path:
    """Save a (1, H, W) label map with the source image's meta (spacing, origin, direction)."""
    if ext == ".dcm":
        ext = ".nrrd"  # a mask is not a DICOM image; NRRD keeps the geometry
    # Single-slice volumes were read as 2D: give the mask back the singleton axes its image has on disk.
    shape = [int(s) for s in image.meta.get("spatial_shape", mask.shape[1:])]
    if len(shape) > 2 and mask[0].numel() == int(np.prod(shape)):
        mask = mask.reshape(1, *shape)
    labelled = MetaTensor(mask.to(torch.uint8), meta=dict(image.meta))
    labelled.meta["filename_or_obj"] = name
    saver = SaveImage(output_dir=str(out_dir), output_ext=ext, output_postfix="", separate_folder=False,
                      output_dtype=np.uint8, resample=False, print_log=False)
    saver(labelled)
    return out_dir / f"{name}{ext}"


def overlay_png(image: torch.Tensor, mask: torch.Tensor, path: Path) -> Path:
    """Grey image with each class tinted and outlined, for a person to check the mask at a glance."""
    grey = image[:3].float().mean(0).numpy()
    low, high = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
    labels = mask[0].numpy().astype(int)
    for value in np.unique(labels[labels > 0]):
        region = labels == value
        colour = OVERLAY_COLOURS[value % len(OVERLAY_COLOURS)]
        rgb[region] = 0.6 * rgb[region] + 0.4 * colour
        rgb[region & ~ndimage.binary_erosion(region)] = colour
    # MONAI readers index (x, y); images are shown as rows = y.
    Image.fromarray(rgb.astype(np.uint8).transpose(1, 0, 2)).save(path)
    return path
