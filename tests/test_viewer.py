"""The viewer workflow's parts that need no PACS or browser: SEGs from other editors read onto the image's grid, a
model's proposal told apart from clinicians' labels (newest wins), the OHIF install served under /viewer/, and clear
answers where there is no viewer. The workflow itself, in OHIF against Orthanc, is in test_pacs_ohif.py."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from textdiff.data.dicom import image_datasets, is_proposal, mask_on_sources, seg_dataset, seg_on_sources
from textdiff.data.studies import DataError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "textdiff"))
from lib.pacs_segs import PacsSegs  # noqa: E402

LABELS = ["background", "lung", "heart"]


@pytest.fixture
def radiograph(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)), str(tmp_path / "a.png"))
    mask = np.zeros((20, 30), np.uint8)
    mask[2:6, 3:9], mask[10:15, 20:25] = 1, 2
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "m.png"))
    sources = image_datasets("a", tmp_path / "a.png", "report")
    return sources, mask, mask_on_sources(tmp_path / "m.png", sources)


def test_a_seg_reads_back_onto_its_sources_by_segment_name(radiograph):
    sources, mask, on_grid = radiograph
    seg = seg_dataset(on_grid, sources, LABELS)
    np.testing.assert_array_equal(seg_on_sources(seg, sources, LABELS)[0], mask)
    # another editor numbered the segments its own way: the names decide the classes
    seg.SegmentSequence[0].SegmentLabel, seg.SegmentSequence[1].SegmentLabel = "Heart", "lung"
    swapped = np.choose(mask, [0, 2, 1])
    np.testing.assert_array_equal(seg_on_sources(seg, sources, LABELS)[0], swapped)
    seg.SegmentSequence[0].SegmentLabel, seg.SegmentSequence[0].SegmentNumber = "tumour", 7
    with pytest.raises(DataError, match="tumour"):
        seg_on_sources(seg, sources, LABELS)


def test_a_label_map_seg_as_ohif_stores_by_default_reads_the_same(radiograph):
    sources, mask, on_grid = radiograph
    seg = seg_dataset(on_grid, sources, LABELS)
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation: one frame, segment numbers as values
    seg.NumberOfFrames, seg.BitsAllocated, seg.BitsStored, seg.HighBit = 1, 8, 8, 7
    seg.PerFrameFunctionalGroupsSequence = seg.PerFrameFunctionalGroupsSequence[:1]
    seg.PixelData = mask.tobytes()
    np.testing.assert_array_equal(seg_on_sources(seg, sources, LABELS)[0], mask)


def test_a_proposal_is_marked_and_a_saved_label_is_not(radiograph):
    sources, _, on_grid = radiograph
    proposal = seg_dataset(on_grid, sources, LABELS, proposal_of="textdiff")
    saved = seg_dataset(on_grid, sources, LABELS)
    assert is_proposal(proposal) and not is_proposal(saved)
    assert {s.SegmentAlgorithmType for s in proposal.SegmentSequence} == {"AUTOMATIC"}
    assert proposal.SeriesDescription == "TextDiff proposal (textdiff)"
    edited = seg_dataset(on_grid, sources, LABELS, proposal_of="textdiff")
    edited.Manufacturer = "Unspecified"  # what OHIF writes into a SEG it stores, even one edited from a proposal
    assert not is_proposal(edited)


class FakePacs:
    """The two DICOMweb calls PacsSegs makes, over a list of SEG datasets."""

    def __init__(self, segs):
        self.segs, self.metadata_calls = segs, 0

    def search_for_instances(self, search_filters):
        assert search_filters == {"Modality": "SEG"}
        return [s.to_json_dict() for s in self.segs]

    def retrieve_instance_metadata(self, study, series, instance):
        self.metadata_calls += 1
        return next(s for s in self.segs if s.SOPInstanceUID == instance).to_json_dict()


def _seg(radiograph, uid: str, time: str, proposal: bool, editor: str = "TextDiff Label"):
    sources, _, on_grid = radiograph
    seg = seg_dataset(on_grid, sources, LABELS, proposal_of="textdiff" if proposal else None)
    seg.SOPInstanceUID, seg.SeriesTime, seg.Manufacturer = uid, time, editor
    del seg.PixelData
    return seg


def test_the_newest_clinician_seg_is_the_final_label_and_a_proposal_never_is(radiograph):
    image = str(radiograph[0][0].SeriesInstanceUID)
    pacs = FakePacs([_seg(radiograph, "1.1", "120000", proposal=True)])
    segs = PacsSegs(pacs)
    assert segs.finals() == {} and segs.latest()[1][image].instance == "1.1"
    pacs.segs.append(_seg(radiograph, "1.3", "130000.5", proposal=False, editor="Unspecified"))  # from OHIF
    pacs.segs.append(_seg(radiograph, "1.2", "130000", proposal=False))  # saved through the app, earlier
    finals, proposals = segs.latest()
    assert finals[image].instance == "1.3" and proposals[image].instance == "1.1"
    assert pacs.metadata_calls == 3  # each instance asked about once


def _install_ohif_module():
    spec = importlib.util.spec_from_file_location("install_ohif", REPO / "scripts" / "install_ohif.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ohif_build_is_rewritten_to_be_served_under_viewer(tmp_path):
    install = _install_ohif_module()
    files = {
        "package/dist/index.html": '<script>window.PUBLIC_URL="/"</script><link href="/app.css">'
                                   '<script src="/app-config.js"></script><script src="/app.bundle.js"></script>',
        "package/dist/app.bundle.js": 'x;\n__webpack_require__.p = "/";\ny',
        "package/dist/app.css": "@font-face{src:url(/font.woff2)}",
        "package/dist/app-config.js": "window.config = {}",
        "package/dist/ort/huge.wasm": "left out",
        "package/README.md": "not served",
    }
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    install.extract(archive.getvalue(), tmp_path)
    install.serve_under_prefix(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bundle.js", "app.css", "index.html"]
    html = (tmp_path / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in html and 'src="/viewer/app.bundle.js"' in html
    assert 'href="/viewer/app.css"' in html and 'src="/"' not in html
    assert '__webpack_require__.p = "/viewer/";' in (tmp_path / "app.bundle.js").read_text()
    assert "url(/viewer/font.woff2)" in (tmp_path / "app.css").read_text()
    (tmp_path / "app.bundle.js").write_text("a build of another shape")
    with pytest.raises(SystemExit, match="does not look as expected"):
        install.serve_under_prefix(tmp_path)
