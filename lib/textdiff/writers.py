"""Write predicted masks: a mask file on its image's grid, and a PNG overlay to look at.

The geometry is copied from the image file's own header as ITK reads it, which is what 3D Slicer shows (a DX file's
PixelSpacing honoured where ITK would fall back to 1 mm), rather than rebuilt from a MetaTensor's affine as MONAI's
writers do; the format follows the file name (.nrrd, .nii.gz, .png, TIFF)."""

from __future__ import annotations

from pathlib import Path

import itk
import matplotlib
import numpy as np
import pydicom
import torch
from PIL import Image
from scipy import ndimage

from textdiff.data.studies import DataError

OVERLAY_COLOURS = np.array([[0, 0, 0], [255, 60, 60], [60, 200, 255], [255, 210, 0], [120, 255, 120],
                            [200, 120, 255], [255, 140, 60]], np.uint8)


def label_colour(index: int) -> list[int]:
    """The RGB colour of class `index` in overlays and DICOM SEG segments (the palette repeats past its end)."""
    return [int(c) for c in OVERLAY_COLOURS[1 + (index - 1) % (len(OVERLAY_COLOURS) - 1)]] if index else [0, 0, 0]


def mask_extension(image_path: Path) -> str:
    """The mask's file type for an image: the image's own (NIfTI, NRRD, PNG), else PNG for a 2D picture (JPEG is
    lossy; TIFF and BMP are seldom read as label maps) and NRRD for DICOM and any volume."""
    name = image_path.name.lower()
    if name.endswith((".nii.gz", ".nii", ".nrrd")):
        return ".nii.gz" if name.endswith(".nii.gz") else image_path.suffix.lower()
    suffix = image_path.suffix.lower()
    if suffix == ".dcm" or (suffix in (".tif", ".tiff") and sum(n > 1 for n in read_geometry(image_path)["size"]) > 2):
        return ".nrrd"
    return ".png"


def read_geometry(reference: Path) -> dict:
    """Size, spacing, origin and direction of an image file as ITK sees it (header only, no pixels read)."""
    io = itk.ImageIOFactory.CreateImageIO(str(reference), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise DataError(f"cannot read the geometry of '{reference}': not an image format ITK knows")
    io.SetFileName(str(reference))
    io.ReadImageInformation()
    dims = range(io.GetNumberOfDimensions())
    spacing = [io.GetSpacing(i) for i in dims]
    return {
        "size": [io.GetDimensions(i) for i in dims],
        "spacing": _dicom_pixel_spacing(reference, spacing) if io.GetNameOfClass() == "GDCMImageIO" else spacing,
        "origin": [io.GetOrigin(i) for i in dims],
        "direction": np.array([io.GetDirection(i) for i in dims]).T,  # GetDirection(i) is the i-th axis (a column)
    }


def _dicom_pixel_spacing(reference: Path, spacing: list[float]) -> list[float]:
    """ITK reads a DX/CR file's spacing from ImagerPixelSpacing only, and falls back to 1 mm; a file that has only
    PixelSpacing keeps its own spacing here (column spacing first, as ITK orders axes)."""
    header = pydicom.dcmread(str(reference), stop_before_pixels=True)
    if "PixelSpacing" in header and "ImagerPixelSpacing" not in header:
        row, column = (float(v) for v in header.PixelSpacing)
        return [column, row, *spacing[2:]]
    return spacing


def save_mask(mask: torch.Tensor | np.ndarray, reference: Path, out_path: Path, compress: bool = True,
              dtype: type = np.uint8) -> Path:
    """Write a (1, *spatial) label map onto the grid of its image file: same size, spacing, origin and direction.

    The mask is in MONAI's index order (x, y[, z]), which is ITK's index order for every reader we use, so copying the
    reference's ITK geometry puts the mask exactly on the image in any viewer. Singleton axes of the image (a
    single-slice NIfTI) come back. The format follows `out_path`'s extension (.nrrd, .nii.gz, .png, ...). A soft
    map (probabilities) is written with dtype=np.float32, which PNG cannot hold.
    """
    geometry = read_geometry(Path(reference))
    array = np.asarray(mask)[0].astype(dtype)
    if array.dtype.kind == "f" and str(out_path).lower().endswith((".png", ".jpg")):
        raise DataError("a soft map is floating point: ask for .nrrd or .nii.gz, a PNG holds only 8-bit values")
    if array.size != int(np.prod(geometry["size"])):
        raise DataError(f"a mask of shape {array.shape} does not fit image '{reference}' of size {geometry['size']}")
    if str(out_path).lower().endswith((".png", ".jpg")) and sum(s > 1 for s in geometry["size"]) > 2:
        raise DataError(f"'{reference}' is a volume: ask for .nrrd or .nii.gz, a PNG holds one slice")
    image = itk.image_from_array(np.ascontiguousarray(array.reshape(geometry["size"]).T))  # ITK arrays are (z, y, x)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(geometry["direction"])))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(image, str(out_path), compression=compress)
    return out_path


def heatmap_png(image: torch.Tensor, soft: torch.Tensor, path: Path) -> Path:
    """Grey image under a translucent heat map of a (1, H, W) soft map in [0, 1]."""
    grey = _grey(image)
    heat = matplotlib.colormaps["inferno"](np.clip(soft[0].numpy(), 0, 1))[..., :3]
    rgb = (0.5 * grey[..., None] + 0.5 * heat) * 255
    Image.fromarray(rgb.astype(np.uint8).transpose(1, 0, 2)).save(path)
    return path


def _grey(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) image -> (H, W) in [0, 1], robust to outliers."""
    grey = image[:3].float().mean(0).numpy()
    low, high = np.percentile(grey, (0.5, 99.5))
    return np.clip((grey - low) / max(high - low, 1e-6), 0, 1)


def _display_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, X, Y) image -> (X, Y, 3) float in [0, 255]: its own colours when it has three channels, else grey."""
    if image.shape[0] >= 3:
        colour = image[:3].float().permute(1, 2, 0).numpy()
        low, high = np.percentile(colour, (0.5, 99.5))
        return 255 * np.clip((colour - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(255 * _grey(image)[..., None], 3, axis=2)


def overlay_png(image: torch.Tensor, mask: torch.Tensor, path: Path) -> Path:
    """The image (in colour when it is) with each class tinted and outlined, to check the mask at a glance."""
    rgb = _display_rgb(image).astype(np.float32)
    labels = mask[0].numpy().astype(int)
    for value in np.unique(labels[labels > 0]):
        region = labels == value
        colour = np.array(label_colour(int(value)), np.uint8)
        rgb[region] = 0.6 * rgb[region] + 0.4 * colour
        rgb[region & ~ndimage.binary_erosion(region)] = colour
    # MONAI readers index (x, y); images are shown as rows = y.
    Image.fromarray(rgb.astype(np.uint8).transpose(1, 0, 2)).save(path)
    return path
