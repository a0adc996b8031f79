"""A studies folder as DICOM, so it can live in a PACS: each image becomes a DICOM study that carries its report, each
final mask a DICOM SEG that references its image, and STOW-RS uploads them over DICOMweb.

UIDs are derived from the image id, so exporting the same folder twice gives the same studies (a PACS keeps one
copy). The report travels in the image's `ImageComments` (an LT element of up to 10240 characters), where the app's
DICOMweb datastore reads it back. Grey 2D images become single-frame Digital X-Ray images, colour ones RGB Secondary
Capture images; 3D volumes one instance per slice of the modality asked for (OHIF's MONAI Label mode opens only CT
and MR volumes).
"""

from __future__ import annotations

import datetime
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from tqdm import tqdm

from textdiff.data.studies import DataError, read_studies
from textdiff.writers import label_colour

logger = logging.getLogger(__name__)

REPORT_KEYWORD = "ImageComments"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/textdiff-label")
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VOLUME_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                      "OT": "1.2.840.10008.5.1.4.1.1.7"}
CT_MR_OT = tuple(VOLUME_SOP_CLASSES)
# SNOMED CT codes for the segment of a chest finding, as DICOM SEG requires a category and a type for each segment.
FINDING_CATEGORY = {"CodeValue": "49755003", "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Morphologically Altered Structure"}
FINDING_TYPE = {"CodeValue": "128477000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Abnormal"}
MANUFACTURER = "TextDiff Label"
PROPOSAL_CONTENT_LABEL = "PROPOSAL"
PROPOSAL_DESCRIPTION = "TextDiff proposal"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage: what OHIF 3.10+ stores by default


@dataclass(frozen=True)
class ExportedStudy:
    image_id: str
    files: list[Path]
    seg_file: Path | None


def uid_for(*parts: str) -> str:
    """A valid, reproducible DICOM UID: 2.25 followed by a name-based UUID (RFC 4122 v5) of the parts."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join(parts)).int}"


def read_geometry_image(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DataError(f"cannot read image '{path}': {err}") from err


def _grey_pixels(image: sitk.Image, path: Path) -> tuple[np.ndarray, float, float]:
    """Pixel data as uint8/uint16/int16 plus the rescale (slope, intercept) that gives back the stored values."""
    array = sitk.GetArrayFromImage(image)
    if array.dtype in (np.uint8, np.uint16, np.int16):
        return array, 1.0, 0.0
    low, high = float(array.min()), float(array.max())
    slope = (high - low) / 65535.0 or 1.0
    return np.round((array - low) / slope).astype(np.uint16), slope, low


def _colour_pixels(image: sitk.Image, path: Path) -> np.ndarray:
    """A 2D colour image as (rows, columns, 3) uint8 RGB (alpha dropped; 16-bit colour scaled to 8 bits)."""
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise DataError(f"'{path}' is a colour volume or has {image.GetNumberOfComponentsPerPixel()} channels: "
                        "colour is exported for 2D RGB(A) images only")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.round(255.0 * (array - array.min()) / max(float(np.ptp(array)), 1e-6)).astype(np.uint8)
    return array


def _set_pixels(ds: FileDataset, plane: np.ndarray, slope: float, intercept: float, window: tuple[float, float]) -> None:
    """Pixel data and how to read it: RGB for a colour plane (rows, columns, 3), else grey with rescale and window."""
    ds.Rows, ds.Columns = plane.shape[:2]
    ds.BitsAllocated = ds.BitsStored = plane.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(plane.dtype == np.int16)
    if plane.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        ds.WindowCenter, ds.WindowWidth = float(sum(window) / 2), float(max(window[1] - window[0], 1.0))
    ds.PixelData = np.ascontiguousarray(plane).tobytes()


def _base_dataset(sop_class: str, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def image_datasets(key: str, path: Path, report: str, volume_modality: str = "CT",
                   pixel_spacing: float | None = None) -> list[FileDataset]:
    """The DICOM instances of one image: patient, study and series identifiers, geometry, pixels and the report.

    A grey 2D image becomes a DX instance, a colour one (an H&E tile, a photograph) an RGB Secondary Capture, and a
    volume one instance per slice of `volume_modality`."""
    if volume_modality not in VOLUME_SOP_CLASSES:
        raise DataError(f"volume modality {volume_modality!r} is not one of {', '.join(CT_MR_OT)}")
    image = read_geometry_image(path)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]
    if image.GetNumberOfComponentsPerPixel() > 1:
        planes, slope, intercept = _colour_pixels(image, path)[None], 1.0, 0.0
        modality, sop_class = "OT", SECONDARY_CAPTURE
    else:
        pixels, slope, intercept = _grey_pixels(image, path)
        planes = pixels if pixels.ndim == 3 else pixels[None]
        modality = volume_modality if pixels.ndim == 3 else "DX"
        sop_class = VOLUME_SOP_CLASSES[modality] if pixels.ndim == 3 else DX_FOR_PRESENTATION
    window = tuple(np.percentile(planes, [0.5, 99.5]) * slope + intercept)
    datasets = []
    for index, plane in enumerate(planes):
        ds = _instance(key, index, image, sop_class, modality, pixel_spacing)
        _set_pixels(ds, plane, slope, intercept, window)
        if report:
            setattr(ds, REPORT_KEYWORD, report)
        datasets.append(ds)
    return datasets


def _instance(key: str, index: int, image: sitk.Image, sop_class: str, modality: str,
              pixel_spacing: float | None) -> FileDataset:
    """One instance's identifiers (reproducible from the image id) and its place in space, without pixels."""
    ds = _base_dataset(sop_class, uid_for(key, "instance", str(index)))
    ds.PatientID, ds.PatientName = key, key
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid_for(key, "study"), uid_for(key, "series")
    ds.FrameOfReferenceUID = uid_for(key, "frame-of-reference")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "1", 1, index + 1, ""
    now = datetime.datetime.now()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality, ds.StudyDescription, ds.SeriesDescription = modality, "TextDiff Label study", key
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    is_volume = image.GetDimension() == 3
    spacing = list(image.GetSpacing())
    if pixel_spacing:
        spacing[:2] = [pixel_spacing, pixel_spacing]
    if modality == "DX":
        ds.PresentationIntentType, ds.ImagerPixelSpacing = "FOR PRESENTATION", spacing[:2]
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), image.GetDimension())
    pad = [0.0] * (3 - len(direction))  # a 2D image's in-plane axes, in 3D
    row_dir, col_dir = list(direction[:, 0]) + pad, list(direction[:, 1]) + pad
    origin = image.TransformIndexToPhysicalPoint((0, 0, index) if is_volume else (0, 0))
    ds.ImagePositionPatient = [float(v) for v in (list(origin) + [0.0])[:3]]
    ds.ImageOrientationPatient = [float(v) for v in row_dir[:3] + col_dir[:3]]
    ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing, column spacing
    ds.SliceThickness = float(spacing[2]) if is_volume else 1.0
    return ds


def report_of(dataset: pydicom.Dataset) -> str:
    return str(getattr(dataset, REPORT_KEYWORD, "") or "")


def seg_dataset(mask: sitk.Image, sources: list[pydicom.Dataset], label_names: list[str],
                proposal_of: str | None = None) -> pydicom.Dataset:
    """A DICOM SEG (one segment per class present, named and coloured as the app's labels) of a mask on the grid of
    `sources`, referencing them. `proposal_of` (a model name) marks it as that model's proposal (see `is_proposal`):
    segments AUTOMATIC, never read as a clinician's label; otherwise it is a label saved through the app."""
    if mask.GetDimension() == 2:
        mask = sitk.JoinSeries(mask)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(mask)) if v)
    if not present:
        raise DataError("the mask is empty: DICOM SEG stores only masks with at least one labelled pixel")
    unknown = [v for v in present if v >= len(label_names)]
    if unknown:
        raise DataError(f"the mask has unknown label value(s) {unknown}: expected 1..{len(label_names) - 1}")
    algorithm = ("AUTOMATIC", f"TextDiff Label {proposal_of}") if proposal_of else ("SEMIAUTOMATIC", "TextDiff Label")
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "TextDiffLabel", "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": f"{PROPOSAL_DESCRIPTION} ({proposal_of})" if proposal_of else "TextDiff Label mask",
        "SeriesNumber": "299" if proposal_of else "300", "InstanceNumber": "1", "BodyPartExamined": "",
        "ContentLabel": PROPOSAL_CONTENT_LABEL if proposal_of else "SEGMENTATION",
        "ContentDescription": "TextDiff Label",
        "segmentAttributes": [[{
            "labelID": value, "SegmentLabel": label_names[value], "SegmentDescription": label_names[value],
            "SegmentAlgorithmType": algorithm[0], "SegmentAlgorithmName": algorithm[1],
            "SegmentedPropertyCategoryCodeSequence": FINDING_CATEGORY,
            "SegmentedPropertyTypeCodeSequence": FINDING_TYPE,
            "recommendedDisplayRGBValue": label_colour(value),
        } for value in present]],
    })
    writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=False,
                                          skip_missing_segment=False)
    seg = writer.write(mask, sources)
    now = datetime.datetime.now()
    seg.Manufacturer = MANUFACTURER
    seg.SeriesDate = seg.ContentDate = now.strftime("%Y%m%d")
    seg.SeriesTime = seg.ContentTime = now.strftime("%H%M%S.%f")
    return seg


def is_proposal(seg: pydicom.Dataset) -> bool:
    """A model's proposal written by this app: OHIF and other editors write their own Manufacturer and content label
    into a SEG they save, even one edited from a proposal (whose segments they may still call AUTOMATIC)."""
    return seg.get("Manufacturer") == MANUFACTURER and seg.get("ContentLabel") == PROPOSAL_CONTENT_LABEL


def seg_to_mask(dataset: pydicom.Dataset) -> sitk.Image:
    """The label map of a DICOM SEG (0 = background, segment numbers as values)."""
    return pydicom_seg.MultiClassReader().read(dataset).image


def seg_on_sources(seg: pydicom.Dataset, sources: list[pydicom.Dataset], label_names: list[str]) -> np.ndarray:
    """A SEG from any editor (binary or label-map SOP class) as class indices on the sources' grid, shape
    (len(sources), rows, columns): each frame goes to the source instance it references and each segment to the
    app's label of the same name (else of the same number)."""
    index_of = {str(s.SOPInstanceUID): i for i, s in enumerate(sources)}
    classes = _segment_classes(seg, label_names)
    frames = seg.pixel_array.reshape(int(seg.get("NumberOfFrames", 1)), int(seg.Rows), int(seg.Columns))
    out = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    if frames.shape[1:] != out.shape[1:]:
        raise DataError(f"the SEG is {frames.shape[2]}x{frames.shape[1]} but its image {out.shape[2]}x{out.shape[1]}")
    labelmap = str(seg.SOPClassUID) == LABELMAP_SEG
    for number, frame in enumerate(frames):
        groups = seg.PerFrameFunctionalGroupsSequence[number]
        target = _frame_source(groups, index_of, len(sources))
        if labelmap:
            for segment, value in classes.items():
                out[target][frame == segment] = value
        else:
            segment = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            out[target][frame > 0] = classes[segment]
    return out


def _segment_classes(seg: pydicom.Dataset, label_names: list[str]) -> dict[int, int]:
    lower = [name.lower() for name in label_names]
    classes = {}
    for segment in seg.SegmentSequence:
        number, name = int(segment.SegmentNumber), str(segment.get("SegmentLabel", "")).lower()
        if name in lower[1:]:
            classes[number] = lower.index(name)
        elif 0 < number < len(label_names):
            classes[number] = number
        else:
            raise DataError(f"the SEG's segment {number} '{segment.get('SegmentLabel', '')}' is none of the labels "
                            f"{', '.join(label_names[1:])}")
    return classes


def _frame_source(groups: pydicom.Dataset, index_of: dict[str, int], count: int) -> int:
    """The index of the source instance a SEG frame was derived from (the only one for a single-frame image)."""
    for derivation in groups.get("DerivationImageSequence", []):
        for source in derivation.get("SourceImageSequence", []):
            if str(source.ReferencedSOPInstanceUID) in index_of:
                return index_of[str(source.ReferencedSOPInstanceUID)]
    if count == 1:
        return 0
    raise DataError("a SEG frame names no source image of this series")


def mask_on_sources(mask_path: Path, sources: list[pydicom.Dataset]) -> sitk.Image:
    """A mask file as an image on the sources' grid: 2D masks (PNG) get the geometry of a single-frame source."""
    mask = read_geometry_image(mask_path)
    if mask.GetDimension() == 2 and len(sources) == 1:
        mask = sitk.JoinSeries(mask)
        source = sources[0]
        mask.SetOrigin([float(v) for v in source.ImagePositionPatient])
        spacing = [float(v) for v in source.PixelSpacing]
        mask.SetSpacing([spacing[1], spacing[0], 1.0])
        orientation = np.array(source.ImageOrientationPatient, float)
        row, col = orientation[:3], orientation[3:]
        mask.SetDirection(np.stack([row, col, np.cross(row, col)], axis=1).ravel().tolist())
    return mask


def write_datasets(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


def export_studies(studies: str | Path, out: str | Path, label_names: list[str], volume_modality: str = "CT",
                   pixel_spacing: float | None = None, progress: bool = True) -> list[ExportedStudy]:
    """Write every image of a studies folder (and its final mask, as SEG) into `out/<image id>/`."""
    out = Path(out)
    exported = []
    for case in tqdm(read_studies(studies), desc="to DICOM", disable=not progress):
        datasets = image_datasets(case.id, case.image, case.report, volume_modality, pixel_spacing)
        files = write_datasets(datasets, out / case.id)
        seg_file = None
        if case.label is not None:
            try:
                seg = seg_dataset(mask_on_sources(case.label, datasets), datasets, label_names)
            except DataError as err:
                logger.info("no SEG for %s: %s", case.id, err)
            else:
                seg_file = write_datasets([seg], out / case.id / "seg")[0]
        exported.append(ExportedStudy(case.id, files, seg_file))
    return exported


def dicomweb_client(url: str):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"))
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=200)  # fail in a second, not 30
    return client


def stow(files: list[Path], url: str, progress: bool = True) -> int:
    """Upload DICOM files over STOW-RS, one study per request; returns the number of instances stored."""
    client = dicomweb_client(url)
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)
    stored = 0
    for study_uid, datasets in tqdm(by_study.items(), desc="STOW-RS", disable=not progress):
        try:
            client.store_instances(datasets=datasets, study_instance_uid=study_uid)
        except Exception as err:  # requests' HTTPError or a connection error: say where it failed
            raise DataError(f"STOW-RS upload of study {study_uid} to {url} failed: {err}") from err
        stored += len(datasets)
    return stored


def exported_files(studies: list[ExportedStudy]) -> list[Path]:
    return [f for s in studies for f in (*s.files, *([s.seg_file] if s.seg_file else []))]

