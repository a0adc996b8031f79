"""`GET /logs/gpu`: nvidia-smi's report, or a 404 saying there is no NVIDIA GPU (MONAI Label's answers 500 there)."""

from __future__ import annotations

import shutil
import subprocess

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse
from monailabel.endpoints.user.auth import User

from .common import ADMIN

router = APIRouter(prefix="/logs", tags=["Logs"])


@router.get("/gpu", summary="GPU report from nvidia-smi (admin)", response_class=PlainTextResponse)
def gpu(user: User = ADMIN) -> str:
    command = shutil.which("nvidia-smi")
    if command is None:
        raise HTTPException(404, "no NVIDIA GPU on this server: nvidia-smi is not installed; the app runs on the CPU")
    try:
        return subprocess.run([command], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise HTTPException(404, f"no NVIDIA GPU report on this server: nvidia-smi failed ({err})") from err
