"""`/labeling/`: the worklist of a server that reads its images from a PACS. Each image with whether a clinician
labeled it or a model proposed a mask, a button that pre-annotates it and opens it in the viewer, and one that does
the same for the image active learning picks next; so a clinician never needs a terminal.
"""

from __future__ import annotations

import html
import logging
import os
from urllib.parse import urlencode, urlparse

import SimpleITK as sitk
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ..dicomweb import ReportDICOMwebDatastore
from ..errors import bad_request, not_found
from . import infer
from .auth import PAGE_USER
from .common import ANNOTATOR, app
from .viewer import viewer_url

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Labeling"])


@router.get("/labeling/", response_class=HTMLResponse, summary="The labeling worklist (a web page)")
def worklist(user=PAGE_USER):
    store = _pacs()
    images, (finals, proposals) = store.image_series(), store.segs.latest()
    rows = []
    for key, series in sorted(images.items(), key=lambda item: str(item[1].get("PatientID", ""))):
        state = "labeled" if key in finals else "proposal" if key in proposals else "to label"
        proposal = proposals[key].series if state == "proposal" else ""
        link = viewer_url(str(series.StudyInstanceUID), proposal)
        rows.append(f"<tr><td>{html.escape(str(series.get('PatientID', '')))}</td>"
                    f"<td>{html.escape(str(series.get('Modality', '')))}</td><td>{state}</td>"
                    f"<td>{_button('/labeling/propose', 'Segment with TextDiff', image=key)}</td>"
                    f'<td><a href="{html.escape(link)}">open</a></td></tr>')
    account = f"{html.escape(user.username)} {_button('/logout', 'Log out')}" if user else ""
    page = WORKLIST % {"next": _button("/labeling/next", "Label the next image (active learning)"), "account": account,
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
        if not sitk.GetArrayViewFromImage(sitk.ReadImage(label)).any():  # a SEG cannot hold an empty mask
            logger.info("%s found nothing in %s: the viewer opens without a proposal", model, image)
            return RedirectResponse(viewer_url(str(store.image_series()[image].StudyInstanceUID)), status_code=303)
        stored = store.save_proposal(image, label, model)
    finally:
        os.unlink(label)
    logger.info("proposal of %s for %s stored in the PACS as SEG %s", model, image, stored["SeriesInstanceUID"])
    return RedirectResponse(viewer_url(stored["StudyInstanceUID"], stored["SeriesInstanceUID"]), status_code=303)


@router.post("/labeling/next", summary="Pre-annotate the image active learning picks next and open it")
async def propose_next(request: Request, strategy: str = "uncertainty", model: str = "", user=ANNOTATOR):
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
    if origin and urlparse(origin).netloc != request.headers.get("host", ""):  # (TLS may end at a proxy in front)
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
<h1>TextDiff Label</h1>%(account)s<p>%(labeled)s of %(total)s images labeled. <a href="/viewer/">Study list</a></p>
%(next)s
<table><tr><th>patient</th><th>modality</th><th>label</th><th></th><th></th></tr>
%(rows)s
</table></body></html>"""
