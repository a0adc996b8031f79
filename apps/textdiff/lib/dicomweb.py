"""MONAI Label's DICOMweb datastore (`--studies http://HOST:PORT/dicom-web`) with what this app needs on top.

- Each image's report is read from its DICOM (`ImageComments`, where `textdiff export-dicom` puts it), so it
  travels with the study; it is edited in the PACS, not through this server.
- Images are all series that hold pixels (DX, CR, CT, MR, ...), not only CT as MONAI Label's default filter has;
  lists are asked of the PACS each time, so a mask saved a moment ago counts as a label at once.
- A label is checked (readable, the image's size, known classes) before anything reaches the PACS, then stored as a
  DICOM SEG written with pydicom-seg: MONAI Label would download the dcmqi tools at start-up, which cannot be done here.
- A model's proposal for the viewer is stored as a SEG marked as such (`save_proposal`); an image's `final` label is
  its newest SEG that is not a proposal (`PacsSegs`), whichever editor wrote it, read onto the image's own grid.
- Whole-folder tasks (pretraining, the CDM) read `studies_dir`: the downloaded images with a `reports.csv`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset
from textdiff.data.studies import write_reports
from textdiff.data.dicom import mask_on_sources, report_of, seg_dataset, seg_on_sources

from .datastore import check_label_file
from .errors import bad_request, check_id, client_errors, not_found
from .pacs_segs import PacsSegs, SegInstance

logger = logging.getLogger(__name__)

NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG"}


def dicomweb_client(url: str) -> DICOMwebClientX:
    """The client MONAI Label would make (its URL prefixes and credentials settings)."""
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    return DICOMwebClientX(url=url.rstrip("/"), session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                           wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                           stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)


class ReportDICOMwebDatastore(DICOMWebDatastore):
    def __init__(self, url: str, cache_path: str, label_names: list[str]):
        super().__init__(dicomweb_client(url), search_filter={}, cache_path=cache_path,
                         fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME, convert_to_nifti=True)
        self._label_names = list(label_names)
        self.segs = PacsSegs(self._client)

    # --- what the PACS holds ---------------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        return sorted(self.image_series())

    def image_series(self) -> dict[str, Dataset]:
        """Every series that holds pixels, by its UID (QIDO's study, patient, modality and description attributes)."""
        series = [Dataset.from_json(s) for s in self._client.search_for_series()]
        return {str(s.SeriesInstanceUID): s for s in series if str(s.get("Modality", "")) not in NON_IMAGE_MODALITIES}

    def get_labeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        if label_tag not in (None, DefaultLabelTag.FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        return sorted(set(self.segs.finals()) & set(self.list_images()))  # asked of the PACS each time

    def get_unlabeled_images(self, label_tag: str | None = None, labels=None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.segs.finals()))

    def datalist(self, full_path: bool = True) -> list[dict]:
        """(image, final label) pairs, each label the image's newest clinician SEG as a NIfTI on the image's grid."""
        finals = self.segs.finals()
        return [{"image": self.get_image_uri(image_id), "label": self._final_label(image_id, finals[image_id])}
                for image_id in sorted(set(finals) & set(self.list_images()))]

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag == DefaultLabelTag.FINAL:
            return self._final_label(image_id or label_id)
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        if tag == DefaultLabelTag.FINAL:
            self._final_label(image_id)
        return LocalDatastore.get_label_by_image_id(self, image_id, tag)

    def _known(self, image_id: str) -> str:
        check_id(image_id)
        if image_id not in self.list_images():
            raise not_found(f"no image '{image_id}' in the PACS")
        return image_id

    def _sources(self, image_id: str) -> list[pydicom.Dataset]:
        """The image's downloaded DICOM instances (downloaded on first use), in the slice order of its NIfTI."""
        self.get_image_uri(image_id)
        folder = Path(self._datastore.image_path()) / image_id
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
        return sorted(sources, key=_position_along_normal) if len(sources) > 1 else sources

    # --- reports ---------------------------------------------------------------------------------------------
    def report(self, image_id: str) -> str:
        sources = self._sources(image_id)
        return report_of(sources[0]) if sources else ""

    def image_labels(self) -> dict[str, str]:
        """Image-level labels have no DICOM home here yet: none."""
        return {}

    def get_image_info(self, image_id: str) -> dict:
        self._known(image_id)
        info = super().get_image_info(image_id) or {}
        info.update(report=self.report(image_id), image_label=None)
        return info

    def update_image_info(self, image_id: str, info: dict) -> None:
        self._known(image_id)
        if "report" in info or "image_label" in info:
            raise bad_request("with a PACS, reports come from the images' DICOM (ImageComments): change them there")
        super().update_image_info(image_id, info)

    def check_upload(self, image_filename: str, image_info: dict) -> None:
        self.add_image("", image_filename, image_info)

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        raise bad_request("this server reads its images from a PACS: store new images there (STOW-RS, e.g. "
                          "`textdiff export-dicom --data <studies> --out <dir> --stow <dicom-web url>`)")

    def remove_image(self, image_id: str) -> None:
        raise bad_request("this server reads its images from a PACS: remove images there")

    # --- labels ----------------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_id: str = "") -> str:
        """Check the label, store a final one in the PACS as a DICOM SEG, then keep it in the local cache."""
        self._known(image_id)
        check_id(label_tag, "label tag")
        check_label_file(Path(self.get_image_uri(image_id)), Path(label_filename), len(self._label_names))
        label_info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL:
            label_info.update(self._store_seg(image_id, Path(label_filename)))
        return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)

    def save_proposal(self, image_id: str, label_filename: str, model: str) -> dict:
        """A model's mask stored in the PACS as a proposal for the viewer (never a final label), and kept as the
        image's `original` label so the proposal's worth can be scored once a clinician saves theirs."""
        self._known(image_id)
        check_label_file(Path(self.get_image_uri(image_id)), Path(label_filename), len(self._label_names))
        info = {"model": model, **self._store_seg(image_id, Path(label_filename), proposal_of=model)}
        LocalDatastore.save_label(self, image_id, label_filename, DefaultLabelTag.ORIGINAL, info)
        return info

    def _store_seg(self, image_id: str, mask: Path, proposal_of: str | None = None) -> dict:
        sources = self._sources(image_id)
        with client_errors():
            seg = seg_dataset(mask_on_sources(mask, sources), sources, self._label_names, proposal_of)
        if proposal_of:
            seg.SeriesNumber = self._number_before_other_segs(str(sources[0].StudyInstanceUID), int(seg.SeriesNumber))
        seg_file = Path(self._datastore.label_path(DefaultLabelTag.FINAL)) / f".{image_id}.seg.dcm"
        seg.save_as(seg_file)
        try:
            series = dicom_web_upload_dcm(str(seg_file), self._client)
        finally:
            seg_file.unlink()
        return {"SOPInstanceUID": str(seg.SOPInstanceUID), "SeriesInstanceUID": series,
                "StudyInstanceUID": str(sources[0].StudyInstanceUID), "Modality": "SEG"}

    def _number_before_other_segs(self, study: str, default: int) -> int:
        """A series number below every SEG of the study: OHIF's SEG layout opens the SEG numbered lowest, and the
        viewer is to open on the proposal (the SEGs OHIF stores are numbered above the study's highest)."""
        numbers = [int(Dataset.from_json(s).get("SeriesNumber") or 0)
                   for s in self._client.search_for_series(study, search_filters={"Modality": "SEG"})]
        return max(2, min(numbers + [default + 1]) - 1)

    def _final_label(self, image_id: str, seg: SegInstance | None = None) -> str:
        """The local copy of the image's newest clinician SEG (`seg`, else asked of the PACS), fetched and converted
        when that SEG changed; "" when the image has none."""
        seg = seg or self.segs.finals().get(image_id)
        if seg is None:
            return ""
        cached = LocalDatastore.get_label_by_image_id(self, image_id, DefaultLabelTag.FINAL)
        if cached and LocalDatastore.get_label_info(self, cached, DefaultLabelTag.FINAL).get(
                "SOPInstanceUID") == seg.instance:
            return LocalDatastore.get_label_uri(self, cached, DefaultLabelTag.FINAL)
        dataset = self._client.retrieve_instance(seg.study, seg.series, seg.instance)
        with client_errors():
            classes = seg_on_sources(dataset, self._sources(image_id), self._label_names)
        image = sitk.ReadImage(self.get_image_uri(image_id))
        mask = sitk.GetImageFromArray(classes.reshape(sitk.GetArrayViewFromImage(image).shape[:image.GetDimension()]))
        mask.CopyInformation(image)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"{image_id}.nii.gz")
            sitk.WriteImage(mask, path)
            info = {"SOPInstanceUID": seg.instance, "SeriesInstanceUID": seg.series, "StudyInstanceUID": seg.study,
                    "Modality": "SEG"}
            label_id = LocalDatastore.save_label(self, image_id, path, DefaultLabelTag.FINAL, info)
        return LocalDatastore.get_label_uri(self, label_id, DefaultLabelTag.FINAL)

    # --- whole-folder tasks ----------------------------------------------------------------------------------
    @property
    def studies_dir(self) -> Path:
        """Every image downloaded (as NIfTI) with their reports in `reports.csv`, for tasks that read a folder."""
        images = self.list_images()
        for key in images:
            self.get_image_uri(key)
        folder = Path(self._datastore.image_path())
        write_reports(folder, {key: (self.report(key), None) for key in images},
                      {key: f"{key}.nii.gz" for key in images})
        return folder

    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        return super().get_image_uri(image_id)


def _position_along_normal(source: pydicom.Dataset) -> float:
    orientation = np.array(source.ImageOrientationPatient, float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.array(source.ImagePositionPatient, float)))


def cache_folder(model_dir: str) -> str:
    """MONAI Label's cache setting when given, else a folder beside the app's models."""
    return settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip() or os.path.join(model_dir, "dicomweb-cache")
