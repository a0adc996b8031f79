"""`/viewer/`: OHIF 3 (`scripts/install_ohif.py` installs it), for a server that reads its images from a PACS, with a
locked-down config that reads and stores the studies through MONAI Label's DICOMweb proxy. Its segmentation mode
shows a model's proposal over a radiograph or a volume, edits it with the brush and eraser and stores the result back
in the PACS as a DICOM SEG. Its header links to the worklist (`labeling`).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from ..errors import not_found
from .auth import page_login

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
async def viewer_file(request: Request, path: str = ""):
    """OHIF's static files; any other path is one of its routes, answered by its page (after a login, when login
    is on: the page's DICOMweb requests then carry the login cookie)."""
    root = _viewer_folder().resolve()
    wanted = (root / path).resolve()
    if path and wanted.is_file() and wanted.is_relative_to(root):
        return FileResponse(wanted)
    await page_login(request)
    return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})


@router.get(VIEWER, include_in_schema=False)
def viewer_root():
    return RedirectResponse(f"{VIEWER}/", status_code=307)
