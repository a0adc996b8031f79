"""What the app's endpoints share: roles, form fields that must be JSON objects, uploads that never outlive their
request."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from fastapi import Depends, UploadFile
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC
from monailabel.interfaces.utils.app import app_instance

from ..errors import bad_request

# MONAI Label's roles (checked only when MONAI_LABEL_AUTH_ENABLE is set): annotators label and infer, admins train,
# replace and delete models and read the logs.
ADMIN = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
ANNOTATOR = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
MAX_PARAMS_CHARS = 16_384


def app():
    return app_instance()


def json_object(text: str | None, name: str) -> dict:
    """A form field or body that must hold a JSON object ({} when empty); a 422 otherwise."""
    if not text:
        return {}
    if len(text) > MAX_PARAMS_CHARS:
        raise bad_request(f"'{name}' is {len(text)} characters long: at most {MAX_PARAMS_CHARS}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad_request(f"'{name}' is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise bad_request(f"'{name}' must be a JSON object, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def saved_upload(file: UploadFile, default_ext: str = ".nii.gz") -> Iterator[str]:
    """The upload in a temporary folder under its own file name (so messages name the user's file), removed when the
    request ends, refused or not."""
    name = os.path.basename(file.filename or "")[-100:].lstrip(".") or f"upload{default_ext}"
    folder = tempfile.mkdtemp(prefix="upload-")
    path = os.path.join(folder, name)
    try:
        with open(path, "wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)
