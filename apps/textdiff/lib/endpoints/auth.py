"""Login (`MONAI_LABEL_AUTH_ENABLE=true`, a Keycloak-style realm at `MONAI_LABEL_AUTH_REALM_URI`).

MONAI Label 0.8.5 decodes tokens without naming the signing algorithm, which PyJWT 2 refuses: every token, good or
bad, is answered 401. This token check replaces it for every endpoint (a FastAPI dependency override): RS256 tokens
signed with the realm's public key and not expired; roles read where MONAI_LABEL_AUTH_TOKEN_ROLES says.
"""

from __future__ import annotations

import jwt
import requests
from fastapi import Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import User, get_public_key, oauth2_scheme

ALGORITHMS = ["RS256"]


def _claim(payload: dict, path: str):
    value = payload
    for key in path.split("#"):
        value = value.get(key) if isinstance(value, dict) else None
    return value


async def current_user(token: str = Depends(oauth2_scheme)) -> User:
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
