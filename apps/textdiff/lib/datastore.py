"""A LocalDatastore that keeps each image's report with the image, and checks what clients put into it.

Reports live in the studies folder's `reports.csv` sidecar (the file the sample data and `textdiff import-lvit`
write, and the `textdiff` CLI reads), so there is one source of truth that survives restarts. Clients read a report
in the image info (`GET /datastore/image/info`) and set it with `PUT /datastore/image/info` (`{"report": "..."}`).
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock
from monailabel.datastore.local import LocalDatastore
from textdiff.data.studies import IMAGE_EXTENSIONS, check_mask, check_report, read_image, read_reports, write_reports
from textdiff.errors import DataError

from .errors import bad_request, check_id, client_errors, not_found

EXTENSIONS = [f"*{ext}" for ext in IMAGE_EXTENSIONS]


class ReportDatastore(LocalDatastore):
    def __init__(self, studies: str, num_classes: int, auto_reload: bool, read_only: bool = False):
        super().__init__(studies, extensions=EXTENSIONS, auto_reload=auto_reload, read_only=read_only)
        self._studies = Path(studies)
        self._num_classes = num_classes
        self._reports_lock = FileLock(str(self._studies / ".reports.lock"))

    @property
    def studies_dir(self) -> Path:
        return self._studies

    # --- reports ---------------------------------------------------------------------------------------------
    def report(self, image_id: str) -> str:
        return read_reports(self._studies).get(image_id, ("", None))[0]

    def image_labels(self) -> dict[str, str]:
        """Image id -> image-level label (e.g. normal), for the images that have one; one read of the sidecar."""
        return {key: label for key, (_, label) in read_reports(self._studies).items() if label}

    def _write_report(self, image_id: str, report: object, image_label: object = None) -> None:
        with client_errors():
            report = check_report(report, f"report of image '{image_id}'")
            _check_image_label(image_label)
        with self._reports_lock:
            rows = read_reports(self._studies)
            old_label = rows.get(image_id, ("", None))[1]
            rows[image_id] = (report, image_label if image_label is not None else old_label)
            write_reports(self._studies, rows, self._names(rows))

    def _names(self, rows: dict) -> dict[str, str]:
        """File names for the sidecar; rows of images not (yet) in the datastore keep their id."""
        objects = self._datastore.objects
        return {k: self._filename(k, objects[k].image.ext) if k in objects else k for k in rows}

    def _known(self, image_id: str) -> str:
        check_id(image_id)
        if image_id not in self._datastore.objects:
            raise not_found(f"no image '{image_id}' in the datastore")
        return image_id

    # --- LocalDatastore overrides ----------------------------------------------------------------------------
    def get_image_info(self, image_id: str) -> dict:
        info = super().get_image_info(image_id)
        if info:
            report, image_label = read_reports(self._studies).get(image_id, ("", None))
            info.update(report=report, image_label=image_label)
        return info

    def update_image_info(self, image_id: str, info: dict) -> None:
        self._known(image_id)
        info = dict(info)
        if "report" in info or "image_label" in info:
            self._write_report(image_id, info.pop("report", self.report(image_id)), info.pop("image_label", None))
        if info:
            super().update_image_info(image_id, info)

    def check_upload(self, image_filename: str, image_info: dict) -> None:
        """An image file and its info that `add_image` would store (4xx otherwise); nothing is written."""
        name = os.path.basename(image_filename)
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            raise bad_request(f"unsupported image type '{name}': use one of {', '.join(IMAGE_EXTENSIONS)}")
        with client_errors():
            if "report" in image_info:
                check_report(image_info["report"], f"report of '{name}'")
            _check_image_label(image_info.get("image_label"))
            read_image(Path(image_filename), "image")

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """Refuse unsafe ids, unreadable files and bad reports before anything is copied."""
        image_info = dict(image_info or {})
        if image_id:
            check_id(image_id)
        self.check_upload(image_filename, image_info)
        report, image_label = image_info.pop("report", None), image_info.pop("image_label", None)
        image_id = super().add_image(image_id, image_filename, image_info)
        if report is not None or image_label is not None:
            self._write_report(image_id, report or "", image_label)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        """A label must be readable, the size of its image and hold known classes; a bad one replaces nothing."""
        self._known(image_id)
        check_id(label_tag, "label tag")
        check_label_file(Path(self.get_image_uri(image_id)), Path(label_filename), self._num_classes)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        self._known(image_id)
        with self._reports_lock:
            rows = read_reports(self._studies)
            if rows.pop(image_id, None) is not None:
                write_reports(self._studies, rows, self._names(rows))
        super().remove_image(image_id)

    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        return super().get_image_uri(image_id)


def _check_image_label(image_label: object) -> None:
    if image_label is not None and (not isinstance(image_label, str) or len(image_label) > 100):
        raise DataError(f"image_label must be text of at most 100 characters, got {image_label!r:.40}")


def check_label_file(image_path: Path, label_path: Path, num_classes: int) -> None:
    """A label must be readable, the size of its image and hold known classes (else a 422)."""
    with client_errors():
        image = read_image(image_path, "image")
        label = read_image(label_path, "label")
        if _without_singletons(label) == _without_singletons(image):  # a 2D image's label may be one slice
            label = label[:1].reshape(1, *image.shape[1:])
        check_mask(label, tuple(image.shape[1:]), num_classes, label_path)


def _without_singletons(data) -> tuple[int, ...]:
    return tuple(s for s in data.shape[1:] if s != 1)
