"""Refuse request bodies over a size limit (413) before they are read into memory or onto the disk."""

from __future__ import annotations

import json


class BodyLimit:
    """ASGI middleware: a declared Content-Length over `max_bytes` is refused at once; a streamed body is cut off
    when it passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refused = True
                raise BodyTooLarge
            return message

        async def unless_refused(message):
            if not refused:  # what the app answers to a body it could not read (400, 500) is replaced by the 413
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except BodyTooLarge:
            pass
        if refused:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"the request body is larger than {self.max_bytes:,} bytes "
                                     "(--conf max_upload_mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass
