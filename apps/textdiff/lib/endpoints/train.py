"""`POST /train/{model}`: params checked in the server process (422), one run at a time (409), then MONAI Label's
background job; `run_sync=true` runs off the event loop."""

from __future__ import annotations

import threading

from fastapi import APIRouter, Body, HTTPException
from fastapi.concurrency import run_in_threadpool
from monailabel.endpoints.user.auth import User
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import processes, tasks

from ..errors import client_errors, not_found
from .common import ADMIN, MAX_PARAMS_CHARS, app

router = APIRouter(prefix="/train", tags=["Train"])
_starting = threading.Lock()


def training_now() -> bool:
    """A train job is queued or running (MONAI Label lists a job before its process starts)."""
    return bool(processes("train")) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train"))


@router.post("/{model}", summary="Train a model (admin); 409 while another run is going")
async def train(model: str, params: dict | None = Body(None), run_sync: bool = False, user: User = ADMIN):
    instance = app()
    trainer = instance._trainers.get(model)
    if trainer is None:
        raise not_found(f"no trainer '{model}': available are {sorted(instance._trainers)}")
    if len(repr(params)) > MAX_PARAMS_CHARS:
        raise HTTPException(413, f"train params longer than {MAX_PARAMS_CHARS} characters")
    with client_errors():
        checked = trainer.check_params(params or {})
    with _starting:
        if training_now():
            raise HTTPException(409, "a training run is going: wait for it (GET /train/) or stop it (DELETE /train/)")
        if not run_sync:
            result, detail = AsyncTask.run("train", request={"model": model}, params=checked)
            return result
    result, _ = await run_in_threadpool(AsyncTask.run, "train", {"model": model}, checked, True)
    return result

