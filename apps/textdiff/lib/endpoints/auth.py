"""Login (`MONAI_LABEL_AUTH_ENABLE=true`, a Keycloak-style realm at `MONAI_LABEL_AUTH_REALM_URI`).

MONAI Label 0.8.5 decodes tokens without naming the signing algorithm, which PyJWT 2 refuses: every token, good or
bad, is answered 401. This token check replaces it for every endpoint (a FastAPI dependency override): RS256 tokens
signed with the realm's public key and not expired; roles read where MONAI_LABEL_AUTH_TOKEN_ROLES says. The token
comes in the `Authorization: Bearer` header (Slicer, scripts) or in the login cookie a browser got from `/login`
(the worklist, and the viewer's DICOMweb requests through the app's proxy).
"""

from __future__ import annotations

from urllib.parse import urlencode

import jwt
import requests
from fastapi import Depends, HTTPException, Request
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User, get_public_key

ALGORITHMS = ["RS256"]
COOKIE = "textdiff_login"  # HttpOnly, SameSite=Strict: sent only with this server's own pages' requests


def _claim(payload: dict, path: str):
    value = payload
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def request_token(request: Request) -> str:
    """The bearer token of the request's Authorization header, else of the login cookie ("" without either)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else request.cookies.get(COOKIE, "")


async def current_user(request: Request) -> User:
    token = request_token(request)
    if not token:
        raise HTTPException(401, "Not authenticated: log in (/login) or send a bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        key = get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    except requests.RequestException as err:
        raise HTTPException(503, f"the login server does not answer: {err}") from None
    try:
        payload = jwt.decode(token, key, algorithms=ALGORITHMS, options={"verify_aud": False})
    except jwt.InvalidTokenError as err:
        raise HTTPException(401, f"invalid token: {err}", headers={"WWW-Authenticate": "Bearer"}) from None
    roles = _claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
    return User(username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or "",
                email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
                roles=[r for r in roles if isinstance(r, str)] if isinstance(roles, list) else [])


async def page_login(request: Request) -> User | None:
    """For a page a browser opens (the worklist, the viewer): with login on and no valid login, a redirect to the
    login page, which comes back here; a logged-in user without the user role gets a 403."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return None
    try:
        user = await current_user(request)
    except HTTPException as err:
        if err.status_code != 401:
            raise
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "log in first", headers={"Location": f"/login?{urlencode({'next': here})}"}) from None
    return await RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)(user)


PAGE_USER = Depends(page_login)
