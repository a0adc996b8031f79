"""The PACS's DICOM SEGs, by the image they label: a model's proposals apart from what clinicians saved.

A proposal is a SEG this app stored for a model (`textdiff.data.dicom.is_proposal`); every other SEG referencing an
image (saved from OHIF, Slicer or through this server) is a clinician's label, and the newest of them, by its series
date and time, is the image's `final` label. SEGs are told apart per instance: an editor may store a new version
into the series of the one it edited. An instance never changes once stored, so what each one is gets asked of the
PACS once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from textdiff.data.dicom import is_proposal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegInstance:
    study: str
    series: str
    instance: str
    image: str  # the SeriesInstanceUID of the image it labels
    proposal: bool
    created: str  # date and time, sortable as text


class PacsSegs:
    def __init__(self, client):
        self._client = client
        self._seen: dict[str, SegInstance | None] = {}  # SOP instance UID -> what it is (None: it labels no series)

    def all(self) -> list[SegInstance]:
        found = []
        for entry in self._client.search_for_instances(search_filters={"Modality": "SEG"}):
            listed = Dataset.from_json(entry)
            uid = str(listed.SOPInstanceUID)
            if uid not in self._seen:
                self._seen[uid] = self._describe(str(listed.StudyInstanceUID), str(listed.SeriesInstanceUID), uid)
            if self._seen[uid] is not None:
                found.append(self._seen[uid])
        return found

    def finals(self) -> dict[str, SegInstance]:
        """Each labeled image's newest clinician SEG."""
        return self.latest()[0]

    def latest(self) -> tuple[dict[str, SegInstance], dict[str, SegInstance]]:
        """Each image's newest clinician SEG, and its newest model proposal (from one listing of the PACS)."""
        segs = self.all()
        return _newest(s for s in segs if not s.proposal), _newest(s for s in segs if s.proposal)

    def _describe(self, study: str, series: str, instance: str) -> SegInstance | None:
        meta = Dataset.from_json(self._client.retrieve_instance_metadata(study, series, instance))
        references = meta.get("ReferencedSeriesSequence")
        if not references:
            logger.warning("SEG %s references no image series: not a label", instance)
            return None
        return SegInstance(study, series, instance, str(references[0].SeriesInstanceUID), is_proposal(meta),
                           _created(meta))


def _created(meta: Dataset) -> str:
    date = str(meta.get("SeriesDate") or meta.get("ContentDate") or "")
    time = str(meta.get("SeriesTime") or meta.get("ContentTime") or "")
    hours, _, fraction = time.partition(".")
    return f"{date:0<8}{hours:0<6}.{fraction:0<6}"


def _newest(segs) -> dict[str, SegInstance]:
    chosen: dict[str, SegInstance] = {}
    for seg in sorted(segs, key=lambda s: (s.created, s.instance)):
        chosen[seg.image] = seg
    return chosen
