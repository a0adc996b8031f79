"""The web viewer and the labeling worklist, for a server that reads its images from a PACS.

- `/viewer/`: OHIF 3 (`scripts/install_ohif.py` installs it) with a locked-down config that reads and stores the
  studies through MONAI Label's DICOMweb proxy; its segmentation mode shows a model's proposal over a radiograph
  or a volume, edits it with the brush and eraser and stores the result back in the PACS as a DICOM SEG.
- `/labeling/`: the images, which have a clinician's label or a proposal, and buttons that pre-annotate an image
  (or the one active learning picks next) and open it in the viewer. The viewer's header links back here.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from ..dicomweb import ReportDICOMwebDatastore
from ..errors import bad_request, not_found
from . import infer
from .common import ANNOTATOR, USER, app

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Viewer"])
VIEWER = "/viewer"
folder: Path | None = None  # set by `install`: where OHIF's static files are (None: no PACS, no viewer)
# OHIF stores what it exports through the data source it reads from: uncompressed binary SEGs, which every DICOM
# SEG reader opens (its default, the label-map SOP class with RLE, is newer than most of them).
CONFIG = """window.config = {
  routerBasename: '%(base)s',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'pacs',
  whiteLabeling: {
    createLogoComponentFn: React => React.createElement('a', {href: '/labeling/', id: 'textdiff-worklist',
      style: {color: '#5acce6', fontWeight: 600, marginRight: 16}}, 'TextDiff Label worklist'),
  },
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'pacs',
    configuration: {
      friendlyName: 'TextDiff Label PACS',
      name: 'pacs',
      qidoRoot: window.location.origin + '/proxy/dicom/qido',
      wadoRoot: window.location.origin + '/proxy/dicom/wado',
      wadoUriRoot: window.location.origin + '/proxy/dicom/wado',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: {enabled: true},
      omitQuotationForMultipartRequest: true,
      segmentation: {store: {defaultMode: 'bitmap', transferSyntaxUID: '1.2.840.10008.1.2.1'}},
    },
  }],
};
"""


def viewer_url(study: str, proposal: str = "") -> str:
    """The study in OHIF's segmentation mode; with a `proposal` SEG series, in OHIF's SEG layout: that SEG (numbered
    below the study's other SEGs, see `save_proposal`) drawn over its image."""
    query = {"StudyInstanceUIDs": study}
    if proposal:
        query.update(hangingProtocolId="@ohif/seg", initialSeriesInstanceUID=proposal)
    return f"{VIEWER}/segmentation?{urlencode(query)}"


def _viewer_folder() -> Path:
    if folder is None:
        raise not_found("the viewer reads its studies from a PACS: start the server with "
                        "--studies http://HOST:PORT/dicom-web")
    if not (folder / "index.html").is_file():
        raise not_found(f"the OHIF viewer is not installed in {folder}: run `python3 scripts/install_ohif.py`")
    return folder


@router.get(f"{VIEWER}/app-config.js", include_in_schema=False)
def viewer_config():
    _viewer_folder()
    return Response(CONFIG % {"base": VIEWER}, media_type="text/javascript")


@router.get(f"{VIEWER}/{{path:path}}", include_in_schema=False)
def viewer_file(path: str = ""):
    """OHIF's static files; any other path is one of its routes, answered by its page."""
    root = _viewer_folder().resolve()
    wanted = (root / path).resolve()
    if path and wanted.is_file() and wanted.is_relative_to(root):
        return FileResponse(wanted)
    return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})


@router.get(VIEWER, include_in_schema=False)
def viewer_root():
    return RedirectResponse(f"{VIEWER}/", status_code=307)


@router.get("/labeling/", response_class=HTMLResponse, summary="The labeling worklist (a web page)")
def worklist(user=USER):
    store = _pacs()
    images, finals, proposals = store.image_series(), store.segs.finals(), store.segs.proposals()
    rows = []
    for key, series in sorted(images.items(), key=lambda item: str(item[1].get("PatientID", ""))):
        state = "labeled" if key in finals else "proposal" if key in proposals else "to label"
        proposal = proposals[key].series if state == "proposal" else ""
        link = viewer_url(str(series.StudyInstanceUID), proposal)
        rows.append(f"<tr><td>{html.escape(str(series.get('PatientID', '')))}</td>"
                    f"<td>{html.escape(str(series.get('Modality', '')))}</td><td>{state}</td>"
                    f"<td>{_button('/labeling/propose', 'Segment with TextDiff', image=key)}</td>"
                    f'<td><a href="{html.escape(link)}">open</a></td></tr>')
    page = WORKLIST % {"next": _button("/labeling/next", "Label the next image (active learning)"),
                       "rows": "\n".join(rows), "labeled": len(set(finals) & set(images)),
                       "total": len(rows)}
    return HTMLResponse(page)


@router.post("/labeling/propose", summary="Pre-annotate an image and open it in the viewer")
async def propose(request: Request, image: str, model: str = "", user=ANNOTATOR):
    """The image's proposal (`textdiff`, or `cdm` while no textdiff model exists) stored in the PACS as a SEG marked
    as a proposal, then a redirect (303) into the viewer on its study."""
    _same_origin(request)
    instance, store = app(), _pacs()
    model = model or _proposal_model(instance)
    result = await infer.queue.run(instance.infer, {"model": model, "image": image,
                                                    "result_extension": ".nii.gz", "result_dtype": "uint8"})
    label = result.get("label")
    if not label or not os.path.isfile(label):
        raise bad_request(f"{model} gave no mask for {image}")
    try:
        stored = store.save_proposal(image, label, model)
    finally:
        os.unlink(label)
    logger.info("proposal of %s for %s stored in the PACS as SEG %s", model, image, stored["SeriesInstanceUID"])
    return RedirectResponse(viewer_url(stored["StudyInstanceUID"], stored["SeriesInstanceUID"]), status_code=303)


@router.post("/labeling/next", summary="Pre-annotate the image active learning picks next and open it")
async def propose_next(request: Request, strategy: str = "diverse", model: str = "", user=ANNOTATOR):
    _same_origin(request)
    _pacs()
    chosen = app().next_sample({"strategy": strategy})  # unknown strategies are refused there
    if not chosen.get("id"):
        raise not_found("every image has a label")
    return await propose(request, chosen["id"], model)


def _same_origin(request: Request) -> None:
    """The worklist's buttons are plain forms, which any web page could submit to this server: a browser names the
    page's origin on such a post, and only this server's own pages may press them."""
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise HTTPException(403, f"a page from {origin} may not press the worklist's buttons")


def _pacs() -> ReportDICOMwebDatastore:
    store = app().datastore()
    if not isinstance(store, ReportDICOMwebDatastore):
        raise not_found("the labeling worklist is for a server that reads its images from a PACS")
    return store


def _proposal_model(instance) -> str:
    """textdiff once it has weights; before that the cdm when it has (it needs no drawn mask)."""
    infers = instance._infers
    textdiff_ready = "textdiff" in infers and infers["textdiff"].is_valid()
    return "cdm" if not textdiff_ready and "cdm" in infers and infers["cdm"].is_valid() else "textdiff"


def _button(action: str, text: str, **query: str) -> str:
    target = f"{action}?{urlencode(query)}" if query else action
    return (f'<form method="post" action="{html.escape(target)}">'
            f'<button type="submit">{html.escape(text)}</button></form>')


WORKLIST = """<!doctype html><html><head><meta charset="utf-8"><title>TextDiff Label worklist</title>
<style>body{font-family:sans-serif;margin:2em;background:#090c29;color:#eee}a{color:#5acce6}
td{padding:4px 12px}form{margin:0}</style></head><body>
<h1>TextDiff Label</h1><p>%(labeled)s of %(total)s images labeled. <a href="/viewer/">Study list</a></p>
%(next)s
<table><tr><th>patient</th><th>modality</th><th>label</th><th></th><th></th></tr>
%(rows)s
</table></body></html>"""
