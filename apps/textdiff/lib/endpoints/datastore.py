"""The datastore's write endpoints: JSON-object params, no silent replacement of an image, no upload left behind."""

from __future__ import annotations

import os

from fastapi import APIRouter, BackgroundTasks, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from monailabel.endpoints.user.auth import User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import remove_file
from textdiff.data.studies import image_id as image_id_of

from ..errors import check_id, not_found
from .common import ANNOTATOR, app, json_object, saved_upload

router = APIRouter(prefix="/datastore", tags=["Datastore"])


@router.put("/image", summary="Upload a new image (409 when the id exists, unless overwrite=true)")
async def add_image(image: str | None = None, overwrite: bool = False, params: str = Form("{}"),
                    file: UploadFile = File(...), user: User = ANNOTATOR):
    info = json_object(params, "params")
    store = app().datastore()
    with saved_upload(file) as path:
        image_id = check_id(image or image_id_of(os.path.basename(file.filename or "")))
        await run_in_threadpool(store.check_upload, path, info)  # nothing is stored or removed for a bad upload
        if image_id in store.list_images():
            if not overwrite:
                raise HTTPException(409, f"image '{image_id}' exists: choose another id, or send overwrite=true "
                                         "to replace it (its labels are removed with it; its report is kept unless "
                                         "the upload brings one)")
            info = {"report": store.report(image_id), **info}
            store.remove_image(image_id)
        image_id = await run_in_threadpool(store.add_image, image_id, path, {**info, "user": user.username})
    return {"image": image_id}


@router.put("/label", summary="Save a label")
async def save_label(image: str, tag: str = DefaultLabelTag.FINAL.value, params: str = Form("{}"),
                     label: UploadFile = File(...), user: User = ANNOTATOR):
    info = json_object(params, "params")
    store = app().datastore()
    with saved_upload(label) as path:
        label_id = await run_in_threadpool(store.save_label, image, path, tag or DefaultLabelTag.FINAL.value,
                                           {**info, "user": user.username})
    result = app().on_save_label(image, label_id) or {}
    return {**result, "image": image, "label": label_id}


@router.put("/image/info", summary="Update an image's info (its report, its image-level label)")
async def update_image_info(image: str, info: str = Form("{}"), user: User = ANNOTATOR):
    return app().datastore().update_image_info(image, {**json_object(info, "info"), "user": user.username})


@router.put("/label/info", summary="Update a label's info")
async def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = ANNOTATOR):
    store = app().datastore()
    check_id(label, "label id")
    check_id(tag, "label tag")
    if not store.get_label_by_image_id(label, tag):
        raise not_found(f"no '{tag}' label for image '{label}'")
    return store.update_label_info(label, tag, {**json_object(info, "info"), "user": user.username})


@router.get("/dataset", summary="Download the labeled images as a ZIP archive")
async def download_dataset(background_tasks: BackgroundTasks, limit_cases: int | None = None, user: User = ANNOTATOR):
    store = app().datastore()
    if not store.datalist():
        raise not_found("no labeled image to put in an archive")
    path = await run_in_threadpool(store.get_dataset_archive, limit_cases)
    background_tasks.add_task(remove_file, path)
    return FileResponse(path, media_type="application/zip", filename="dataset.zip")

