"""`/login` and `/logout`: a login in the browser for the worklist and the viewer, when login is on.

The form's user name and password go to the realm's token endpoint (OAuth2 password grant, as MONAI Label's own
`POST /auth/token` does, with `MONAI_LABEL_AUTH_CLIENT_ID`); the token comes back as an HttpOnly, SameSite=Strict
cookie that the worklist's buttons and the viewer's DICOMweb requests carry (`auth.request_token`). Roles are the
token's, as for every other client.
"""

from __future__ import annotations

import html
import logging

import requests
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import token_uri

from .auth import COOKIE

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Login"], include_in_schema=False)
HOME = "/labeling/"


def _local(target: str) -> str:
    """Where to go after logging in: a path on this server only (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else HOME


@router.get("/login", response_class=HTMLResponse)
def login_page(next: str = HOME):  # noqa: A002 - the query parameter's name
    return HTMLResponse(FORM % {"next": html.escape(_local(next)), "message": ""})


@router.post("/login")
def log_in(request: Request, username: str = Form(...), password: str = Form(...), next: str = Form(HOME)):  # noqa: A002
    target = _local(next)
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return RedirectResponse(target, status_code=303)
    try:
        answer = requests.post(token_uri(), timeout=settings.MONAI_LABEL_AUTH_TIMEOUT, data={
            "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": username, "password": password,
            "grant_type": "password"})
    except requests.RequestException as err:
        logger.warning("the login server does not answer: %s", err)
        return HTMLResponse(FORM % {"next": html.escape(target), "message": "The login server does not answer."}, 503)
    if answer.status_code != 200 or "access_token" not in answer.json():
        return HTMLResponse(FORM % {"next": html.escape(target), "message": "Wrong user name or password."}, 401)
    token = answer.json()
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token["access_token"], max_age=int(token.get("expires_in", 300)), httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
def log_out():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


FORM = """<!doctype html><html><head><meta charset="utf-8"><title>TextDiff Label: log in</title>
<style>body{font-family:sans-serif;margin:2em;background:#090c29;color:#eee}input{display:block;margin:.3em 0 1em}
.message{color:#ff8a80}</style></head><body>
<h1>TextDiff Label</h1><p class="message">%(message)s</p>
<form method="post" action="/login"><input type="hidden" name="next" value="%(next)s">
<label>User name<input name="username" autocomplete="username" autofocus required></label>
<label>Password<input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>"""
