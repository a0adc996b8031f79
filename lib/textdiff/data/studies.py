"""Reading a MONAI Label studies folder (images, `labels/final` masks, `reports.csv`) into model-ready tensors.

Layout: images in the folder itself; masks under `labels/final/` with the same image id; an optional
`reports.csv` with columns `image` (file name), `report` and `label` (image-level class, e.g. normal / infection).
An image with no report gets the empty text: it still gets a mask.
"""

from __future__ import annotations

import csv
import functools
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import PIL.Image
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, Resize, ScaleIntensityRangePercentiles

from textdiff.data.items import Item
from textdiff.config import BackboneConfig
from textdiff.errors import DataError, ImageTooLarge  # noqa: F401 - part of this module's interface
from textdiff.data.tiling import to_working_grid

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
REPORTS_FILE = "reports.csv"
# Marks a folder of synthetic image-mask pairs (EMIT-Diff), which must never be read as real studies.
SYNTHETIC_MARKER = "SYNTHETIC.json"
REPORT_COLUMNS = ("image", "report", "label")
MAX_REPORT_CHARS = 2000


@dataclass
class ImageLimits:
    """The largest image any reader decodes, checked on the file's header first: a 164 KB PNG can hold 13000x13000
    pixels, which would take gigabytes to decode and segment. A server sets its own with `set_image_limits`."""

    max_plane_pixels: int = 40_000_000  # a 2D image or a volume's largest plane: about 6300x6300
    max_voxels: int = 600_000_000  # a whole volume: 512x512x2048 fits


LIMITS = ImageLimits()


def set_image_limits(limits: ImageLimits) -> None:
    LIMITS.max_plane_pixels, LIMITS.max_voxels = limits.max_plane_pixels, limits.max_voxels


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    label: Path | None = None
    report: str = ""
    image_label: str | None = None


def image_id(path: str | Path) -> str:
    """The MONAI Label image id: the file name without its (possibly double) extension."""
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS) and not path.name.startswith(".")


def check_report(report: object, where: str) -> str:
    """A report must be text of sane length; None/NaN means no report."""
    if report is None or (isinstance(report, float) and np.isnan(report)):
        return ""
    if not isinstance(report, str):
        raise DataError(f"{where}: the report must be text, got {type(report).__name__} {report!r}")
    if len(report) > MAX_REPORT_CHARS:
        raise DataError(f"{where}: the report has {len(report)} characters; at most {MAX_REPORT_CHARS} are accepted")
    return report.strip()


def read_reports(folder: str | Path) -> dict[str, tuple[str, str | None]]:
    """Map image id -> (report, image-level label) from `reports.csv`, empty when the file is absent."""
    path = Path(folder) / REPORTS_FILE
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a byte-order mark
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "report"} <= set(reader.fieldnames):
            raise DataError(f"{path}: needs columns 'image' and 'report' (and optionally 'label'), has {reader.fieldnames}")
        rows = {}
        for line, row in enumerate(reader, start=2):
            report = check_report(row["report"], f"{path} line {line}")
            rows[image_id(row["image"])] = (report, (row.get("label") or "").strip() or None)
    return rows


def write_reports(folder: str | Path, rows: dict[str, tuple[str, str | None]], names: dict[str, str]) -> Path:
    """Write `reports.csv` atomically; `names` maps image id -> image file name."""
    path = Path(folder) / REPORTS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")  # the line endings the file was made with
        writer.writerow(REPORT_COLUMNS)
        for key in sorted(rows):
            report, label = rows[key]
            writer.writerow([names[key], report, label or ""])
    tmp.replace(path)
    return path


def find_by_id(folder: Path, key: str) -> Path | None:
    if not folder.is_dir():
        return None
    matches = [p for p in sorted(folder.iterdir()) if is_image_file(p) and image_id(p) == key]
    return matches[0] if matches else None


def read_studies(folder: str | Path, label_tag: str = "final") -> list[Case]:
    """All images of a studies folder, sorted by id, with their mask (if any) and report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"studies folder '{folder}' does not exist")
    if any((place / SYNTHETIC_MARKER).exists() for place in (folder, folder.parent)):
        raise DataError(f"'{folder}' holds synthetic image-mask pairs ({SYNTHETIC_MARKER}), not real studies: "
                        "use them for augmentation (--synthetic), never as real data")
    reports = read_reports(folder)
    labels_dir = folder / "labels" / label_tag
    cases = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        key = image_id(path)
        report, image_label = reports.get(key, ("", None))
        cases.append(Case(key, path, find_by_id(labels_dir, key), report, image_label))
    if not cases:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'")
    return cases


_loaders = threading.local()


def _loader() -> LoadImage:
    """One MONAI loader per thread (readers keep per-read state): building one sets up every reader, and MONAI's GPU
    DICOM reader logs a warning each time it is set up without a GPU (once per image, before)."""
    if not hasattr(_loaders, "load"):
        with warnings.catch_warnings():  # no GPU DICOM decoder is normal here: pydicom's own decoders read the files
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            _loaders.load = LoadImage(image_only=True, ensure_channel_first=True)
    return _loaders.load


def read_image(path: Path, what: str) -> MetaTensor:
    """Load one file channel-first, 2D or 3D; any reader failure becomes a DataError naming the file."""
    if not Path(path).is_file():
        raise DataError(f"{what} file '{path}' does not exist")
    check_extent(Path(path), what)
    try:
        return _loader()(str(path))
    except Exception as err:  # readers raise many types for corrupt files
        raise DataError(f"cannot read {what} '{path}': it is corrupt or not a supported image ({err})") from err


def image_extent(path: Path) -> tuple[int, ...]:
    """The spatial size a file's header declares, read without decoding its pixels."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return tuple(int(s) for s in nibabel.load(path).header.get_data_shape()[:3])
    if name.endswith(".nrrd"):
        header = nrrd.read_header(str(path))
        return tuple(int(s) for s in header["sizes"][-int(header["dimension"]):])[-3:]
    if name.endswith(".dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns), int(getattr(ds, "NumberOfFrames", 1) or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        with PIL.Image.open(path) as img:
            return img.size[1], img.size[0], int(getattr(img, "n_frames", 1))


def check_extent(path: Path, what: str) -> None:
    """Refuse, before decoding, an image larger than `LIMITS` (ImageTooLarge); a header nobody can read is left to
    the reader, which names the file in its error."""
    try:
        extent = image_extent(path)
    except PIL.Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{what} '{path.name}' is too large to read: {err}") from err
    except Exception:  # noqa: BLE001 - corrupt or unusual headers: the full reader reports them
        return
    largest = sorted(extent, reverse=True)
    plane = largest[0] * (largest[1] if len(largest) > 1 else 1)
    if plane > LIMITS.max_plane_pixels or int(np.prod(extent)) > LIMITS.max_voxels:
        raise ImageTooLarge(
            f"{what} '{path.name}' is {'x'.join(map(str, extent))} pixels: this reader accepts at most "
            f"{LIMITS.max_plane_pixels:,} pixels per plane and {LIMITS.max_voxels:,} in a volume")


def read_2d(path: Path, what: str) -> MetaTensor:
    """Load one 2D image or single-slice file channel-first, as (C, X, Y)."""
    return as_slice(read_image(path, what), path)


def as_slice(data: MetaTensor, path: Path | str) -> MetaTensor:
    """Drop singleton spatial dimensions so single-slice NIfTI/NRRD/DICOM become 2D; reject true volumes."""
    data = _without_singletons(data)
    if data.dim() != 3:
        raise DataError(f"'{path}' has spatial shape {tuple(data.shape[1:])}: the model is 2D (volumes go slice by slice)")
    return data


def read_planes(path: Path, what: str) -> list[MetaTensor]:
    """A 2D image (or single-slice file) as one (C, X, Y) plane; a volume (multi-page TIFF, NIfTI, ...) as its
    slices along the last axis."""
    data = _without_singletons(read_image(path, what))
    if data.dim() == 3:
        return [data]
    if data.dim() == 4:
        return [data[..., z] for z in range(data.shape[-1])]
    raise DataError(f"'{path}' has spatial shape {tuple(data.shape[1:])}: expected a 2D image or a 3D volume")


def is_blank(plane: torch.Tensor) -> bool:
    """One value throughout (a slice outside the body, an empty frame): nothing to learn from or segment."""
    return bool(plane.amax() == plane.amin())


# Adjacent labeled slices that make a volume's mask "drawn whole" for train.volume_slices="auto".
WHOLE_RUN = 5


def slices_to_train(masks: list[torch.Tensor], volume_slices: str) -> str:
    """"all" or "labeled": which slices of a volume with these mask slices train (`TrainConfig.volume_slices`)."""
    if volume_slices != "auto":
        return volume_slices
    labeled = np.array([bool(torch.as_tensor(m).any()) for m in masks])
    runs = _run_lengths(labeled)
    return "all" if len(runs) and runs.max() >= WHOLE_RUN else "labeled"


def check_drawn_in_slices(masks: list[torch.Tensor], path: Path) -> None:
    """Refuse a volume's mask drawn in a few planes across another axis (e.g. coronal slices of an axial stack): the
    model reads slices along the last axis, and each of those would hold a line of the drawing and call the rest of
    the slice background. Planes drawn apart (runs one plane thick) along an axis, and more labeled slices along the
    last axis than planes along that one, mark such a drawing; a structure drawn whole is thicker than one plane."""
    labeled = torch.stack([torch.as_tensor(m)[0] != 0 for m in masks], dim=-1)
    planes = [labeled.movedim(axis, 0).flatten(1).any(1).numpy() for axis in range(labeled.dim())]
    for axis, drawn in enumerate(planes[:-1]):
        runs = _run_lengths(drawn)
        if len(runs) and runs.max() == 1 and planes[-1].sum() > drawn.sum():
            raise DataError(f"mask '{path}' is drawn in {len(runs)} plane(s) across axis {axis} of the volume, but the "
                            f"model reads slices along its last axis: draw in those slices instead (a volume drawn "
                            f"whole trains with train.volume_slices=all)")


def _run_lengths(flags: np.ndarray) -> np.ndarray:
    """Lengths of the runs of consecutive True values."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def _without_singletons(data: MetaTensor) -> MetaTensor:
    spatial = data.shape[1:]
    while len(spatial) > 2 and 1 in spatial:
        data = data.squeeze(1 + list(spatial).index(1))
        spatial = data.shape[1:]
    return data


def is_colour(image: torch.Tensor) -> bool:
    """True for a channel-first image whose first three channels differ (an RGB file of a grey image is grey)."""
    image = torch.as_tensor(image)
    return image.shape[0] >= 3 and not (torch.equal(image[0], image[1]) and torch.equal(image[0], image[2]))


@functools.cache
def _say_grey_repeated(channels: int) -> None:
    logger.info("grey images go into a %d-channel backbone with their one channel repeated (as an RGB model sees a "
                "grey photograph)", channels)


def to_channels(image: torch.Tensor, channels: int, what: str = "the image") -> torch.Tensor:
    """Match the backbone's input channels: an alpha channel is dropped, a grey image stored as RGB becomes grey, a
    grey image is repeated for a colour backbone; a colour image for a grey backbone is refused (its colour is what a
    pathologist reads, and averaging it away would be silent)."""
    image = image[:3] if image.shape[0] == 4 and channels != 4 else image
    if image.shape[0] == channels:
        return image
    if channels == 1 and not is_colour(image):
        return image[:1]
    if image.shape[0] == 1:
        _say_grey_repeated(channels)
        return image.repeat(channels, 1, 1)
    if channels == 1:
        raise DataError(f"{what} is in colour but the backbone reads grey images (1 channel): pretrain a colour "
                        "backbone on this data (`textdiff pretrain` takes the channels from the images)")
    raise DataError(f"cannot turn {what}'s {image.shape[0]} channels into the backbone's {channels}")


def preprocess_image(image: torch.Tensor, size: int | tuple[int, int], channels: int, what: str = "the image") -> torch.Tensor:
    """Channel-first 2D image -> (channels, *size) in [-1, 1] (robust percentile scaling, as DDPMs expect)."""
    image = to_channels(torch.as_tensor(image).float(), channels, what)
    if is_blank(image):  # what the scaling gives a blank image, without its divide-by-zero warning
        image = torch.full_like(image, -1.0)
    else:
        image = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=-1.0, b_max=1.0, clip=True)(image)
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[1:]) == shape:
        return torch.as_tensor(image)
    return torch.as_tensor(Resize(shape, mode="bilinear", anti_aliasing=True)(image))


def plane_on_grid(plane: torch.Tensor, backbone: BackboneConfig, what: str = "the image") -> torch.Tensor:
    """A channel-first 2D plane as the model reads it: scaled to [-1, 1] on its own, then onto its working grid."""
    return to_working_grid(preprocess_image(plane, tuple(plane.shape[1:]), backbone.in_channels, what), backbone)


def check_mask(mask: torch.Tensor, image_shape: tuple[int, ...], num_classes: int, path: Path) -> torch.Tensor:
    """A mask must match the image size and hold only known class indices."""
    if tuple(mask.shape[1:]) != tuple(image_shape):
        raise DataError(f"mask '{path}' is {tuple(mask.shape[1:])} but its image is {tuple(image_shape)}")
    values = torch.unique(torch.as_tensor(mask))
    unknown = [v.item() for v in values if v < 0 or v >= num_classes or v != v.round()]
    if unknown:
        raise DataError(
            f"mask '{path}' has unknown label value(s) {unknown[:5]}: expected class indices 0..{num_classes - 1}"
            + (" (0/255 masks: import them with `textdiff import-lvit`, which maps 255 to 1)" if 255 in unknown else "")
        )
    return mask[:1]


def preprocess_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    return torch.as_tensor(Resize((size, size), mode="nearest")(torch.as_tensor(mask).float())).long()


def load_case(case: Case, size: int, channels: int, num_classes: int, tiling: BackboneConfig | None = None) -> Item:
    """Image (C, size, size) in [-1, 1], mask (1, size, size) long or None, report, and the original image and mask.

    With `tiling` (the backbone's config) image and mask go onto the image's working grid instead (`textdiff.data.tiling`:
    resized into one window, or kept at a patch scale and read in windows). The original (unresized) image keeps its
    geometry (meta) so masks can be written back onto it, and the original mask is kept for evaluation at full
    resolution.
    """
    image = read_2d(case.image, "image")
    where = f"image '{case.image}'"
    if tiling is None:
        resized = preprocess_image(image, size, channels, where)
    else:
        resized = plane_on_grid(image, tiling, where)
    item = {
        "id": case.id,
        "image": resized,
        "report": case.report,
        "original_shape": tuple(image.shape[1:]),
        "original_image": image,
        "label": None,
        "original_label": None,
    }
    if case.label is not None:
        mask = check_mask(read_2d(case.label, "mask"), item["original_shape"], num_classes, case.label)
        item = with_mask(item, mask, size if tiling is None else tiling)
    return item


def with_mask(item: Item, mask: torch.Tensor, grid: int | BackboneConfig) -> Item:
    """The item with its checked (1, X, Y) mask kept as it is and resized like the image: to grid² (an int) or onto
    the working grid (a backbone config)."""
    mask = torch.as_tensor(mask)
    resized = preprocess_mask(mask, grid) if isinstance(grid, int) else to_working_grid(mask.float(), grid, nearest=True)
    return {**item, "label": resized.long(), "original_label": mask.long()}
