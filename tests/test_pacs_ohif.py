"""The app on a real PACS: Orthanc with DICOMweb (scripts/orthanc.sh), studies exported and uploaded by `textdiff
export-dicom --stow`, `monailabel start_server --studies http://127.0.0.1:PORT/dicom-web`, and two OHIFs in headless
Chromium (Playwright driving the Debian browser): MONAI Label's at /ohif/ for volumes, and the app's OHIF 3.13 at
/viewer/ for the radiograph workflow. Slow: it starts Orthanc, the server and a browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from textdiff.cli import main as textdiff_cli
from textdiff.data.studies import read_studies, write_reports
from textdiff.data.dicom import seg_dataset, seg_on_sources, seg_to_mask, uid_for

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import APP_DIR, free_port, openid_realm, running_server  # noqa: E402

sys.path.insert(0, str(APP_DIR))
from lib.endpoints.viewer import viewer_url  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample-data"
ARTIFACTS = Path(os.environ.get("TEXTDIFF_TEST_ARTIFACTS", REPO / "test-artifacts"))
VOLUME_ID = "chest_stack"


def _orthanc(command: str, folder: Path, *args: str) -> str:
    result = subprocess.run(["bash", str(REPO / "scripts" / "orthanc.sh"), command, *args], capture_output=True,
                            text=True, env={**os.environ, "ORTHANC_DIR": str(folder)}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _listening(port: int) -> list[str]:
    """Local addresses with a listening socket on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            if state == "0A" and int(address.rsplit(":", 1)[1], 16) == port:
                found.append(address.rsplit(":", 1)[0])
    return found


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    _orthanc("start", folder, str(port))
    yield {"url": f"http://127.0.0.1:{port}/dicom-web", "port": port, "folder": folder}
    _orthanc("stop", folder)


@pytest.fixture(scope="module")
def studies(tmp_path_factory, pacs):
    """Two labeled and two unlabeled sample radiographs, and a 4-slice volume (OHIF's MONAI Label mode shows only
    CT/MR volumes), exported to DICOM and uploaded over STOW-RS."""
    root = tmp_path_factory.mktemp("pacs-studies")
    folder = root / "studies"
    (folder / "labels" / "final").mkdir(parents=True)
    cases = read_studies(SAMPLE / "train")
    chosen = ([c for c in cases if c.label is not None and "No pulmonary" not in c.report][:2]
              + [c for c in cases if c.label is None and "No pulmonary" not in c.report][:2])
    for case in chosen:
        shutil.copy(case.image, folder)
        if case.label is not None:
            shutil.copy(case.label, folder / "labels" / "final")
    slices = [sitk.GetArrayFromImage(sitk.ReadImage(str(c.image))) for c in read_studies(SAMPLE / "test")[:4]]
    volume = sitk.GetImageFromArray(np.stack(slices))
    volume.SetSpacing((1.5, 1.5, 5.0))
    sitk.WriteImage(volume, str(folder / f"{VOLUME_ID}.nii.gz"))
    reports = {c.id: (c.report, c.image_label) for c in chosen}
    write_reports(folder, reports, {c.id: c.image.name for c in chosen})
    assert textdiff_cli(["export-dicom", "--data", str(folder), "--out", str(root / "dicom"),
                         "--stow", pacs["url"]]) == 0
    return {"cases": chosen, "reports": reports, "dicom": root / "dicom"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, pacs, studies):
    root = tmp_path_factory.mktemp("pacs-server")
    deployment = {"studies": pacs["url"], "conf": {"model_dir": str(root / "model"), "epochs": "1"}}
    with running_server(root, deployment) as running:
        yield running.url


def _series(key: str) -> str:
    return uid_for(key, "series")


def _client(pacs):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=pacs["url"])


def _segs(pacs) -> list[pydicom.Dataset]:
    return [pydicom.Dataset.from_json(s) for s in _client(pacs).search_for_series(search_filters={"Modality": "SEG"})]


def _infer_mask(server: str, image: str, tmp_path: Path) -> Path:
    answer = requests.post(f"{server}/infer/textdiff", params={"image": image, "output": "image"},
                           data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})})
    assert answer.status_code == 200, answer.text
    path = tmp_path / f"{image}.nrrd"
    path.write_bytes(answer.content)
    return path


def test_orthanc_listens_only_on_loopback(pacs):
    assert _listening(pacs["port"]) and set(_listening(pacs["port"])) <= {"0100007F", "00000000000000000000000001000000"}


def test_export_carries_identifiers_spacing_report_and_seg(pacs, studies):
    client = _client(pacs)
    assert len(client.search_for_studies()) == len(studies["cases"]) + 1
    for case in studies["cases"]:
        meta = pydicom.Dataset.from_json(client.retrieve_series_metadata(uid_for(case.id, "study"), _series(case.id))[0])
        assert (meta.PatientID, meta.Modality, meta.ImageComments) == (case.id, "DX", case.report)
        assert [float(v) for v in meta.PixelSpacing] == [1.0, 1.0]
    volume = client.search_for_series(search_filters={"SeriesInstanceUID": _series(VOLUME_ID)})
    assert pydicom.Dataset.from_json(volume[0]).Modality == "CT"
    # the exported final masks are SEGs referencing their images, equal to the masks
    labeled = {c.id: c for c in studies["cases"] if c.label is not None}
    referenced = {}
    for seg in _segs(pacs):
        meta = pydicom.Dataset.from_json(client.retrieve_series_metadata(seg.StudyInstanceUID, seg.SeriesInstanceUID)[0])
        referenced[meta.ReferencedSeriesSequence[0].SeriesInstanceUID] = seg
    assert set(referenced) == {_series(k) for k in labeled}
    for key, case in labeled.items():
        seg = referenced[_series(key)]
        dataset = client.retrieve_series(seg.StudyInstanceUID, seg.SeriesInstanceUID)[0]
        mask = sitk.GetArrayFromImage(seg_to_mask(dataset))[0]
        np.testing.assert_array_equal(mask, sitk.GetArrayFromImage(sitk.ReadImage(str(case.label))))


def test_infer_reads_image_and_report_from_the_pacs(server, studies):
    case = studies["cases"][2]  # unlabeled
    answer = requests.post(f"{server}/infer/textdiff", params={"image": _series(case.id), "output": "json"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["text"], result["text_source"]) == (case.report, "datastore")
    info = requests.get(f"{server}/datastore/image/info", params={"image": _series(case.id)}).json()
    assert info["report"] == case.report


def test_inferred_mask_saved_as_seg_reads_back_equal(server, pacs, studies, tmp_path):
    case = studies["cases"][2]  # unlabeled, with an infection in its report
    image = _series(case.id)
    mask_file = _infer_mask(server, image, tmp_path)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file)))
    assert mask.any()
    before = {s.SeriesInstanceUID for s in _segs(pacs)}
    with open(mask_file, "rb") as handle:
        answer = requests.put(f"{server}/datastore/label", params={"image": image, "tag": "final"},
                              files={"label": (mask_file.name, handle)})
    assert answer.status_code == 200, answer.text
    new = [s for s in _segs(pacs) if s.SeriesInstanceUID not in before]
    assert len(new) == 1
    dataset = _client(pacs).retrieve_series(new[0].StudyInstanceUID, new[0].SeriesInstanceUID)[0]
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == image
    assert dataset.StudyInstanceUID == uid_for(case.id, "study")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_to_mask(dataset)).reshape(mask.shape), mask)


def test_bad_labels_and_uploads_are_refused_and_the_pacs_is_unchanged(server, pacs, studies, tmp_path):
    image = _series(studies["cases"][3].id)
    before = {s.SeriesInstanceUID for s in _segs(pacs)}
    wrong_size = tmp_path / "small.nrrd"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkUInt8), str(wrong_size))
    empty = tmp_path / "empty.nrrd"
    sitk.WriteImage(sitk.Image(256, 256, sitk.sitkUInt8), str(empty))
    for path, message in ((wrong_size, "is (32, 32)"), (empty, "empty")):
        with open(path, "rb") as handle:
            answer = requests.put(f"{server}/datastore/label", params={"image": image, "tag": "final"},
                                  files={"label": (path.name, handle)})
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    with open(wrong_size, "rb") as handle:
        answer = requests.put(f"{server}/datastore/image", params={"image": "new"}, files={"file": ("x.nrrd", handle)})
    assert answer.status_code == 422 and "PACS" in answer.json()["detail"]
    answer = requests.put(f"{server}/datastore/image/info", params={"image": image}, data={"info": '{"report": "x"}'})
    assert answer.status_code == 422 and "ImageComments" in answer.json()["detail"]
    assert requests.post(f"{server}/infer/textdiff", params={"image": "1.2.3.4"}).status_code == 404
    assert {s.SeriesInstanceUID for s in _segs(pacs)} == before
    assert requests.get(f"{server}/info/").status_code == 200


def test_ohif_runs_textdiff_and_shows_the_mask(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    study = uid_for(VOLUME_ID, "study")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        try:
            page.goto(f"{server}/ohif/monai-label?StudyInstanceUIDs={study}")
            page.get_by_text("Confirm and Hide").click(timeout=120_000)
            page.get_by_text(VOLUME_ID).first.wait_for(timeout=120_000)
            _wait_for(page, lambda: any("displaySetsToAllImages" in line for line in console), 120, "the volume to load")
            server_field = page.locator("#monailabelServerURL")
            server_field.fill(server + "/")
            server_field.locator("xpath=../../td/button").click()  # connect
            page.get_by_text("Auto-Segmentation").first.click(timeout=60_000)
            before = _mask_coloured_pixels(page.screenshot())
            page.locator("button[title='Run Segmentation']").first.click()
            _wait_for(page, lambda: any("updated the segmentation's scalar data" in line for line in console), 180,
                      "the mask to arrive")
            page.wait_for_timeout(3000)  # let the viewport render the labelmap
        finally:  # the screenshot and the browser's console are the test's artifacts, also when it fails
            shot = page.screenshot(path=str(ARTIFACTS / "ohif-textdiff.png"))
            (ARTIFACTS / "ohif-console.log").write_text("\n".join(console))
            browser.close()
    assert before == 0
    assert _mask_coloured_pixels(shot) > 100, "no segmentation drawn over the image"


def _wait_for(page, condition, seconds: float, what: str) -> None:
    """Poll through Playwright (its console events arrive only while it runs, not during time.sleep)."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out after {seconds} s waiting for {what} in OHIF"
        page.wait_for_timeout(500)


def _mask_coloured_pixels(png: bytes) -> int:
    """Pixels of the viewports drawn in the segment's warm colour: the grey image and the blue UI have none."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)[50:880, 285:1110]
    return int(((rgb[..., 0] - rgb[..., 2] > 60) & (rgb[..., 0] > 120)).sum())


def test_the_viewer_s_searches_reach_the_pacs_with_their_filters(server, studies):
    case = studies["cases"][0]
    found = requests.get(f"{server}/proxy/dicom/qido/studies", params={"PatientID": case.id}).json()
    assert [pydicom.Dataset.from_json(s).PatientID for s in found] == [case.id]


def test_the_viewer_is_served_locked_down_under_viewer(server):
    page = requests.get(f"{server}/viewer/")
    assert page.status_code == 200 and 'src="/viewer/app.bundle.' in page.text
    config = requests.get(f"{server}/viewer/app-config.js").text
    assert "routerBasename: '/viewer'" in config and "/proxy/dicom/wado" in config
    for widening in ("dicomjson", "dicomwebproxy", "dicomlocal", "dangerouslyUseDynamicConfig", "customizationUrl"):
        assert widening not in config  # no ?url= data sources, no config or customization from the URL
    for route in ("/viewer/segmentation?StudyInstanceUIDs=1.2.3", "/viewer/..%2F..%2Fmain.py"):
        answer = requests.get(server + route)  # OHIF's routes, and nothing outside its folder
        assert answer.status_code == 200 and answer.text == page.text


def _browser(playwright):
    return playwright.chromium.launch(executable_path=shutil.which("chromium"), args=[
        "--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist"])


def _page(browser):
    """A page the size of a workstation's screen, and the lines of its console (kept as the test's artifact)."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    return page, console


def _propose(server: str, image: str) -> str:
    """The worklist's "Segment with TextDiff" button: the viewer URL it redirects to."""
    answer = requests.post(f"{server}/labeling/propose", params={"image": image}, allow_redirects=False)
    assert answer.status_code == 303, answer.text
    return answer.headers["location"]


def _open_proposal(page, url: str) -> None:
    """Open the viewer where the worklist sends a clinician, and load the proposal drawn over the image for editing."""
    page.goto(url)
    _load_proposal(page)


def _load_proposal(page) -> None:
    page.get_by_text("Confirm and Hide").click(timeout=120_000)
    page.get_by_text("LOAD", exact=True).click(timeout=120_000)  # the proposal over its image, editable
    page.locator("[data-cy=data-row-title]").first.wait_for(timeout=60_000)
    page.wait_for_timeout(2000)


def _paint_stroke(page, start: tuple[int, int], end: tuple[int, int]) -> None:
    page.locator("[data-cy=Brush-btn]").click()
    page.mouse.move(*start)
    page.mouse.down()
    for step in range(1, 21):
        page.mouse.move(start[0] + (end[0] - start[0]) * step / 20, start[1] + (end[1] - start[1]) * step / 20)
    page.mouse.up()
    page.wait_for_timeout(1000)


def _store_segmentation(page) -> None:
    """Export > DICOM SEG > Save, as a clinician stores the corrected mask in the PACS."""
    page.locator("[data-cy=segmentation-collapsed-more-btn-Labelmap]").click()
    page.get_by_role("menuitem", name="Export").hover()
    item = page.get_by_role("menuitem", name="DICOM SEG")
    item.focus()  # the keyboard, not a pointer path that may cross another item and close the submenu
    item.press("Enter")
    with page.expect_response(lambda r: r.request.method == "POST" and "/proxy/dicom/" in r.url) as stored:
        page.get_by_role("button", name="Save").click()
    assert stored.value.status == 200


def _to_image(page, point: tuple[float, float], size: tuple[int, int]) -> tuple[float, float]:
    """A screen point as (column, row) of the image shown fitted and centred in the viewport's canvas."""
    box = page.locator("[data-cy=viewport-pane] canvas").first.bounding_box()
    scale = min(box["width"] / size[0], box["height"] / size[1])
    left = box["x"] + (box["width"] - size[0] * scale) / 2
    top = box["y"] + (box["height"] - size[1] * scale) / 2
    return (point[0] - left) / scale, (point[1] - top) / scale


def test_viewer_shows_the_proposal_and_a_corrected_one_becomes_the_final_label(server, pacs, studies, tmp_path):
    """The radiograph workflow in a browser: the worklist's "Segment with TextDiff" opens the app's OHIF with the
    proposal drawn over the DX image; a brush stroke, Save; the app then lists the image as labeled, with a final
    label that holds the stroke and equals the proposal elsewhere."""
    from playwright.sync_api import sync_playwright

    case = studies["cases"][3]  # unlabeled, with an infection in its report
    image = _series(case.id)
    size = sitk.ReadImage(str(case.image)).GetSize()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stroke = ((860, 260), (960, 290))
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        page, console = _page(browser)
        try:
            page.goto(f"{server}/labeling/")
            page.locator("tr", has_text=case.id).get_by_role("button", name="Segment with TextDiff").click()
            page.wait_for_url("**/viewer/segmentation?**", timeout=120_000)
            assert uid_for(case.id, "study") in page.url
            assert image not in _labeled(server)  # a proposal is not a label
            assert "proposal" in requests.get(f"{server}/labeling/").text
            _load_proposal(page)
            shot = page.screenshot(path=str(ARTIFACTS / "viewer-proposal.png"))
            stroke_in_image = [_to_image(page, point, size) for point in stroke]
            _paint_stroke(page, *stroke)
            _store_segmentation(page)
        finally:
            (ARTIFACTS / "viewer-console.log").write_text("\n".join(console))
            browser.close()
    assert _mask_coloured_pixels(shot) > 100, "the proposal is not drawn over the image"
    assert image in _labeled(server)
    final, drawn = (_label(server, image, tag, tmp_path) for tag in ("final", "original"))
    on_stroke = _line_pixels(*stroke_in_image)
    assert all(final[row, col] == 1 for col, row in on_stroke), "the stroke is not in the final label"
    changed = np.argwhere(final != drawn)
    assert len(changed) and not (drawn[final != drawn]).any(), "the stroke only adds foreground"
    radius = 25 + 3  # OHIF's default brush radius in mm (1 mm pixels), and a margin for the brush's rasterisation
    distances = np.min([np.hypot(changed[:, 1] - c, changed[:, 0] - r) for c, r in on_stroke], axis=0)
    assert distances.max() <= radius, "the final label differs from the proposal away from the stroke"
    segs = {seg.Manufacturer: seg for seg in _study_segs(pacs, uid_for(case.id, "study"))}
    ours, theirs = segs["TextDiff Label"].SegmentSequence[0], segs["Unspecified"].SegmentSequence[0]  # OHIF's
    assert theirs.SegmentLabel == ours.SegmentLabel == "infection"  # the label's name and colour survive the trip
    assert (ours.SegmentAlgorithmType, theirs.SegmentAlgorithmType) == ("AUTOMATIC", "MANUAL")
    assert np.abs(np.subtract(theirs.RecommendedDisplayCIELabValue, ours.RecommendedDisplayCIELabValue)).max() < 300


def test_a_new_proposal_is_numbered_first_so_the_viewer_opens_it(server, pacs, studies):
    """OHIF's SEG layout opens the study's lowest-numbered SEG: each proposal is numbered below the SEGs already
    there (a labeled image keeps its label: a proposal is not one)."""
    case = studies["cases"][0]
    for _ in range(2):
        location = _propose(server, _series(case.id))
    numbers = {str(s.SeriesInstanceUID): int(s.SeriesNumber) for s in _study_segs(pacs, uid_for(case.id, "study"))}
    newest = parse_qs(urlparse(location).query)["initialSeriesInstanceUID"][0]
    assert numbers[newest] == min(numbers.values()) and len(numbers) == 3
    assert _series(case.id) in _labeled(server)


def test_next_image_opens_in_the_viewer_with_its_slice_by_slice_proposal(server, studies):
    """The worklist's "label the next image": active learning picks the only unlabeled image, a volume; the viewer
    opens on its study with the proposal (one SEG frame per slice) over the CT slices."""
    from playwright.sync_api import sync_playwright

    # random: `diverse` would then hold the volume back from the next annotator, which the test below asks
    answer = requests.post(f"{server}/labeling/next", params={"strategy": "random"}, allow_redirects=False)
    assert answer.status_code == 303, answer.text
    assert uid_for(VOLUME_ID, "study") in answer.headers["location"]
    assert requests.post(f"{server}/labeling/next", params={"strategy": "nope"}).status_code == 404
    other_site = requests.post(f"{server}/labeling/next", headers={"Origin": "https://elsewhere.example"})
    assert other_site.status_code == 403 and "elsewhere.example" in other_site.json()["detail"]
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            _open_proposal(page, server + answer.headers["location"])
            coloured = []
            for _ in range(4):  # every slice of the volume
                coloured.append(_mask_coloured_pixels(page.screenshot()))
                page.locator("[data-cy=viewport-pane]").first.hover()
                page.mouse.wheel(0, 120)
                page.wait_for_timeout(800)
            page.screenshot(path=str(ARTIFACTS / "viewer-volume.png"))
        finally:
            browser.close()
    assert max(coloured) > 100, f"no proposal drawn on any slice ({coloured})"


def _study_segs(pacs, study: str) -> list[pydicom.Dataset]:
    client = _client(pacs)
    return [client.retrieve_series(study, str(pydicom.Dataset.from_json(s).SeriesInstanceUID))[0]
            for s in client.search_for_series(study, search_filters={"Modality": "SEG"})]


def _labeled(server: str) -> set[str]:
    """The images the app trains on: those with a final label."""
    pairs = requests.get(f"{server}/datastore/", params={"output": "train"}).json()
    return {Path(pair["image"]).name.removesuffix(".nii.gz") for pair in pairs}


def _label(server: str, image: str, tag: str, folder: Path) -> np.ndarray:
    answer = requests.get(f"{server}/datastore/label", params={"label": image, "tag": tag})
    assert answer.status_code == 200, answer.text
    path = folder / f"{image}-{tag}.nii.gz"
    path.write_bytes(answer.content)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).squeeze()


def _line_pixels(start: tuple[float, float], end: tuple[float, float]) -> list[tuple[int, int]]:
    """(column, row) pixels along a segment."""
    return [(round(start[0] + (end[0] - start[0]) * t), round(start[1] + (end[1] - start[1]) * t))
            for t in np.linspace(0, 1, 30)]


def test_active_learning_and_training_on_the_pacs(server, studies):
    """Runs after the browser tests: it replaces the demo model the others use."""
    labeled = {_series(c.id) for c in studies["cases"]}  # two exported SEGs, one saved over REST, one from OHIF
    unlabeled = {_series(VOLUME_ID)}
    for strategy in ("random", "diverse"):  # MONAI Label's and ours (diffusion features of the PACS's images)
        answer = requests.post(f"{server}/activelearning/{strategy}", json={})
        assert answer.status_code == 200 and answer.json().get("id") in unlabeled, (strategy, answer.text)
    answer = requests.post(f"{server}/train/textdiff", params={"run_sync": "true"},
                           json={"max_epochs": 1, "val_split": 0.0})
    assert answer.status_code == 200, answer.text
    stats = requests.get(f"{server}/info/").json()["train_stats"]["textdiff"]
    assert stats["labeled_images"] == len(labeled)


def test_a_multi_class_seg_keeps_its_names_and_colours_through_ohif(server, pacs, studies):
    """Runs last: the SEG it leaves names classes this server does not have. A 2-class proposal, loaded in OHIF and
    stored back unchanged, comes back with the same segment names and colours and the same classes per pixel."""
    from playwright.sync_api import sync_playwright

    names = ["background", "infection", "effusion"]
    case = studies["cases"][0]
    client = _client(pacs)
    sources = client.retrieve_series(uid_for(case.id, "study"), _series(case.id))
    mask = np.zeros((sources[0].Rows, sources[0].Columns), np.uint8)
    mask[60:120, 50:110], mask[150:200, 140:210] = 1, 2
    image = sitk.JoinSeries(sitk.GetImageFromArray(mask))
    image.SetOrigin([float(v) for v in sources[0].ImagePositionPatient])
    proposal = seg_dataset(image, sources, names, proposal_of="textdiff")
    proposal.SeriesNumber = 2  # below the study's other SEGs, as the app numbers a proposal, so the viewer opens it
    client.store_instances([proposal])
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            _open_proposal(page, server + viewer_url(uid_for(case.id, "study"), str(proposal.SeriesInstanceUID)))
            page.screenshot(path=str(ARTIFACTS / "viewer-two-classes.png"))
            _store_segmentation(page)
        finally:
            browser.close()
    theirs = {seg.Manufacturer: seg for seg in _study_segs(pacs, uid_for(case.id, "study"))}["Unspecified"]
    segments = {int(s.SegmentNumber): s for s in theirs.SegmentSequence}
    for ours in proposal.SegmentSequence:
        kept = segments[int(ours.SegmentNumber)]
        assert kept.SegmentLabel == ours.SegmentLabel
        assert np.abs(np.subtract(kept.RecommendedDisplayCIELabValue, ours.RecommendedDisplayCIELabValue)).max() < 300
    np.testing.assert_array_equal(seg_on_sources(theirs, sources, names)[0], mask)


@pytest.fixture(scope="module")
def login_server(tmp_path_factory, pacs, studies):
    """A second server on the same PACS with login on, its tokens from a small realm (app_fixtures.REALM_USERS)."""
    root = tmp_path_factory.mktemp("pacs-login")
    deployment = {"studies": pacs["url"], "conf": {"model_dir": str(root / "model"), "epochs": "1"}}
    with openid_realm() as (realm, _):
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm}
        with running_server(root, deployment, env=env) as running:
            yield running.url


def test_with_login_on_an_annotator_logs_in_proposes_and_stores_a_seg_through_the_viewer(login_server, studies):
    """The worklist sends a browser without a login to the login form; logged in as an annotator, its button opens
    the viewer on the proposal, whose DICOMweb requests (and the SEG it stores) go through the app's proxy with the
    login cookie. A user without the annotator role sees the worklist but may not propose; no login, no PACS."""
    from playwright.sync_api import sync_playwright

    case = studies["cases"][2]  # unlabeled, with an infection in its report
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        page, console = _page(browser)
        try:
            page.goto(f"{login_server}/labeling/")
            page.wait_for_url("**/login?**")
            page.get_by_label("User name").fill("ann")
            page.get_by_label("Password").fill("ann-pass")
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url("**/labeling/")
            page.locator("tr", has_text=case.id).get_by_role("button", name="Segment with TextDiff").click()
            page.wait_for_url("**/viewer/segmentation?**", timeout=120_000)
            _load_proposal(page)
            shot = page.screenshot(path=str(ARTIFACTS / "viewer-login-proposal.png"))
            _paint_stroke(page, (860, 260), (960, 290))
            _store_segmentation(page)  # a 200 from the PACS through the proxy, with the login cookie
        finally:
            (ARTIFACTS / "viewer-login-console.log").write_text("\n".join(console))
            browser.close()
    assert _mask_coloured_pixels(shot) > 100, "the proposal is not drawn over the image"
    viewer = requests.Session()
    assert viewer.post(f"{login_server}/login", data={"username": "viewer", "password": "viewer-pass"}).ok
    assert viewer.get(f"{login_server}/labeling/").status_code == 200
    answer = viewer.post(f"{login_server}/labeling/propose", params={"image": _series(case.id)}, allow_redirects=False)
    assert answer.status_code == 403
    assert requests.get(f"{login_server}/proxy/dicom/qido/studies").status_code == 401


def test_orthanc_stops_cleanly(pacs):
    pid = int((pacs["folder"] / "orthanc.pid").read_text())
    _orthanc("stop", pacs["folder"])
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not _listening(pacs["port"]) and not (pacs["folder"] / "orthanc.pid").exists()
    assert "Orthanc stopped" not in _orthanc("stop", pacs["folder"])  # stopping again is a no-op
