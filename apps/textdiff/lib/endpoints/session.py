"""`PUT /session/`: MONAI Label's session upload, with archives unpacked safely (`archives.extract`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, File, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from monailabel.endpoints.user.auth import User

from ..archives import ArchiveError, extract
from ..errors import bad_request
from .common import USER, app

router = APIRouter(prefix="/session", tags=["Session"])
max_unpacked_bytes = 2 << 30  # set by `install` from the app's settings


def _store(files: list[UploadFile], uncompress: bool, expiry: int) -> dict:
    sessions = app().sessions()
    if sessions is None:
        raise HTTPException(406, "sessions are not enabled on this server")
    received = Path(tempfile.mkdtemp(prefix="session-"))
    try:
        paths = []
        for upload in files:
            name = os.path.basename(upload.filename or "") or "upload"
            paths.append(received / name)
            with open(paths[-1], "wb") as out:
                shutil.copyfileobj(upload.file, out)
        data = received if len(paths) > 1 else paths[0]
        if uncompress:
            if len(paths) != 1:
                raise bad_request("uncompress=true takes one archive")
            data = received / "unpacked"
            try:
                extract(paths[0], data, max_unpacked_bytes)
            except ArchiveError as err:
                raise bad_request(str(err)) from None
        session_id, info = sessions.add_session(str(data), expiry, False)
        return {"session_id": session_id, "session_info": info.to_json()}
    finally:
        shutil.rmtree(received, ignore_errors=True)


@router.put("/", summary="Create a session with an image (or a tar/zip of one, uncompress=true)")
async def create_session(uncompress: bool = False, expiry: int = 0, files: list[UploadFile] = File(...),
                         user: User = USER):
    return await run_in_threadpool(_store, files, uncompress, expiry)

