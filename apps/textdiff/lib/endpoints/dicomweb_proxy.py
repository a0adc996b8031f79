"""`/proxy/dicom/{qido,wado,stow}/...` with its query string: MONAI Label 0.8.5's proxy forwards the path only, so
every QIDO search the viewer makes (a patient's other studies, the study list's filters, `Modality=SEG`) came back
with the whole PACS. Served only with a PACS; the forwarding itself (prefixes, credentials) stays MONAI Label's."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from monailabel.endpoints.proxy import proxy_dicom

from .common import USER

router = APIRouter(prefix="/proxy/dicom", include_in_schema=False)


@router.api_route("/{op}/{path:path}", methods=["GET", "POST"])
async def forward(request: Request, op: Literal["qido", "wado", "stow"], path: str, user=USER):
    query = request.url.query
    return await proxy_dicom(request, op, f"{path}?{query}" if query else path)
