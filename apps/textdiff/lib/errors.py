"""Client mistakes become HTTP 4xx answers with the library's message; the server keeps serving.

MONAI Label 0.8.5 turns any other exception into a 500, so the app raises FastAPI's HTTPException itself.
"""

from __future__ import annotations

import contextlib
import re

from fastapi import HTTPException
from textdiff.data.studies import DataError, ImageTooLarge

# Image ids become file names in the studies folder: no separators, no "..", no hidden files, not too long for one.
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def not_found(message: str) -> HTTPException:
    return HTTPException(status_code=404, detail=message)


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def check_id(value: object, what: str = "image id") -> str:
    """An id that cannot name a file outside the studies folder."""
    if not isinstance(value, str) or not SAFE_ID.match(value) or ".." in value:
        raise bad_request(f"invalid {what} {value!r:.60}: use at most 128 letters, digits, '_', '-' and '.'")
    return value


@contextlib.contextmanager
def client_errors():
    """Bad data or parameters (DataError) -> 422 with the message; an image too large to read -> 413. Anything else
    is a bug: MONAI Label answers 500 and logs its traceback."""
    try:
        yield
    except HTTPException:
        raise
    except ImageTooLarge as err:
        raise HTTPException(status_code=413, detail=str(err)) from err
    except DataError as err:
        raise bad_request(str(err)) from err
