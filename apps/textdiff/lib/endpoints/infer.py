"""`POST /infer/{model}`: checked parameters, uploads only from this request, the model run on the work queue."""

from __future__ import annotations

import contextlib
from typing import Literal

from fastapi import APIRouter, BackgroundTasks, File, Form, UploadFile
from monailabel.endpoints.infer import send_response
from monailabel.endpoints.user.auth import User

from ..errors import bad_request, not_found
from .common import USER, app, json_object, saved_upload
from .queue import WorkQueue

router = APIRouter(prefix="/infer", tags=["Infer"])
# What a request's params may not set: where the image comes from and what the server itself adds (and "_" keys).
RESERVED = {"model", "image", "session", "label", "report", "stored_label", "device"}
UPLOAD = "_upload"  # the path of this request's upload: the one file outside the datastore an infer may read
queue: WorkQueue | None = None  # set by `install` from the app's settings


@router.post("/{model}", summary="Segment an image of the datastore (image=<id>), an upload or a session's image")
async def infer(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
                params: str = Form("{}"), file: UploadFile = File(None),
                output: Literal["image", "json", "all"] | None = None, user: User = USER):
    request = {key: value for key, value in json_object(params, "params").items()
               if key not in RESERVED and not key.startswith("_")}
    request.update(model=model, image=image)
    instance = app()
    with contextlib.ExitStack() as stack:
        if session_id:
            session = instance.sessions().get_session(session_id) if instance.sessions() else None
            if not session:
                raise not_found(f"no session '{session_id}'")
            request.update(image=session.image, session=session.to_json())
        if file is not None:
            request["image"] = stack.enter_context(saved_upload(file))
        if not request["image"]:
            raise bad_request("say which image to segment: ?image=<id>, a file upload or ?session_id=<id>")
        if session_id or file is not None:
            request[UPLOAD] = request["image"]
        result = await queue.run(instance.infer, request)
    return send_response(instance.datastore(), result, output, background_tasks)

