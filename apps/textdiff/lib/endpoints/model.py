"""The `textdiff` model file (admin only): replace it with a checked upload, retire it, or roll back.

An upload must be a checkpoint of this app's classes that loads, and publishes like a training run: only when it
segments the labeled validation images at least as well as the model in service (or `force=true`).
"""

from __future__ import annotations

import os
import shutil

from fastapi import APIRouter, File, UploadFile
from fastapi.concurrency import run_in_threadpool
from monailabel.endpoints.user.auth import User
from textdiff.model.segmenter import load_checkpoint
from textdiff.training.comparison import comparison_basis
from textdiff.training.runs import held_out_cases

from ..errors import bad_request, not_found
from ..publish import candidate_path, previous_path, publish_if_better, rollback
from ..trainers.textdiff import labeled_cases
from .common import ADMIN, app, saved_upload

router = APIRouter(prefix="/model", tags=["Model"])
MODEL = "textdiff"


def _checkpoint(model: str):
    config = app().model
    if model != MODEL:
        raise bad_request(f"only the '{MODEL}' model file can be replaced, retired or rolled back here")
    return config.store.checkpoint, config


def _publish_upload(path: str, force: bool) -> dict:
    current, config = _checkpoint(MODEL)
    candidate = candidate_path(current)
    shutil.copyfile(path, candidate)
    try:
        model = load_checkpoint(candidate, config.settings.device)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        candidate.unlink(missing_ok=True)
        raise bad_request(f"not a textdiff checkpoint that loads: {err}") from err
    if model.cfg.head.label_names != config.cfg.head.label_names:
        candidate.unlink(missing_ok=True)
        raise bad_request(f"the uploaded model segments {list(model.cfg.head.label_names[1:])}, not this app's "
                          f"labels {list(config.cfg.head.label_names[1:])}")
    labeled = labeled_cases(app().datastore())
    # nothing is known of what an uploaded model learned: held-out images when there are, else every labeled one
    basis = comparison_basis(labeled, held_out_cases(labeled, config.cfg.train), None, 0)
    return publish_if_better(model, current, basis, config.settings.device, force or not labeled)


@router.put("/{model}", summary="Replace the model with an uploaded checkpoint (admin)")
async def update_model(model: str, force: bool = False, file: UploadFile = File(...), user: User = ADMIN):
    _checkpoint(model)
    with saved_upload(file, ".pt") as path:
        return await run_in_threadpool(_publish_upload, path, force)


@router.delete("/{model}", summary="Take the model out of service (admin); a rollback brings it back")
async def delete_model(model: str, user: User = ADMIN):
    current, _ = _checkpoint(model)
    if not current.is_file():
        raise not_found(f"model '{model}' has no weights")
    os.replace(current, previous_path(current))
    return {"retired": previous_path(current).name}


@router.post("/{model}/rollback", summary="Put the previous model back in service (admin)")
async def rollback_model(model: str, user: User = ADMIN):
    current, _ = _checkpoint(model)
    try:
        rollback(current)
    except FileNotFoundError as err:
        raise not_found(str(err)) from None
    return {"model": current.name, "now_previous": previous_path(current).name}

