"""The app's own versions of the MONAI Label 0.8.5 endpoints that are unsafe as shipped, installed in place of them
when the server starts (the installed package is left as it is):

- uploads bounded in bytes (`BodyLimit`) and pixels (`textdiff.data.studies.ImageLimits`), archives unpacked safely;
- inference off the event loop on a bounded queue; train params checked before a job starts, one run at a time;
- model files replaced only by checked uploads, by admins, with a rollback; an existing image never silently replaced;
- CORS only for the configured origins; report texts kept out of the logs; a login whose tokens verify (`auth`),
  also from a browser's login cookie (`login`: the worklist and the viewer behind the login);
- clients on other machines answered only with a login or from `--conf trusted_networks` (`LocalOnly`);
- `GET /logs/gpu` a 404 with a message on a machine without an NVIDIA GPU, not a 500.

The routes kept from MONAI Label are checked through the app's hooks by `checks`: every request check is here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware

from monailabel.config import settings
from monailabel.endpoints.user.auth import get_current_user

from . import auth, datastore, dicomweb_proxy, infer, labeling, login, logs, model, session, train, viewer
from .body_limit import BodyLimit
from .local_only import LocalOnly, trusted_networks
from .queue import WorkQueue

logger = logging.getLogger(__name__)

# MONAI Label endpoints this app does not serve: whole-slide inference and deprecated aliases of the ones above;
# and without a PACS, the DICOMweb proxy (it would forward to the studies folder's path).
NOT_SERVED = [("/infer/wsi/{model}", "POST"), ("/infer/wsi_v2/{model}", "POST"), ("/datastore/", "PUT"),
              ("/datastore/updatelabelinfo", "PUT"), ("/train/", "POST")]
PROXY = [("/proxy/dicom/{path:path}", "GET"), ("/proxy/dicom/{path:path}", "POST")]
ROUTERS = [module.router for module in (datastore, infer, labeling, login, logs, model, session, train, viewer)]


def _not_served():
    raise HTTPException(404, "this endpoint is not served by TextDiff Label")


def _not_served_router(pacs: bool) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    for path, method in NOT_SERVED + ([] if pacs else PROXY):
        router.add_api_route(path, _not_served, methods=[method])
    return router


def install(server: FastAPI, *, max_upload_bytes: int, infer_workers: int, infer_queue: int,
            cors_origins: list[str], pacs: bool, viewer_dir: str, trusted: str = "") -> None:
    """Put the app's endpoints in front of MONAI Label's (the first route that matches a path and method answers),
    and its limits and CORS rule around all of them."""
    theirs = [route for route in server.router.routes
              if not getattr(getattr(route, "original_router", None), "textdiff_label", False)]  # not a former install
    server.router.routes[:] = theirs
    for router in [*ROUTERS, *([dicomweb_proxy.router] if pacs else []), _not_served_router(pacs)]:
        router.textdiff_label = True
        server.include_router(router)
    server.router.routes[:] = server.router.routes[len(theirs):] + theirs
    server.router._mark_routes_changed()  # FastAPI caches its route order by a version number
    server.openapi_schema = None
    if settings.MONAI_LABEL_AUTH_ENABLE:
        server.dependency_overrides[get_current_user] = auth.current_user
    infer.queue = WorkQueue(infer_workers, infer_queue)
    viewer.folder = Path(viewer_dir) if pacs else None
    session.max_unpacked_bytes = max_upload_bytes
    login, networks = bool(settings.MONAI_LABEL_AUTH_ENABLE), trusted_networks(trusted)
    server.user_middleware = [
        Middleware(LocalOnly, trusted=networks, login=login),
        Middleware(CORSMiddleware, allow_origins=cors_origins, allow_credentials=bool(cors_origins),
                   allow_methods=["*"], allow_headers=["*"]),
        Middleware(BodyLimit, max_bytes=max_upload_bytes),
    ]
    server.middleware_stack = server.build_middleware_stack()
    logger.info("browser origins allowed (CORS): %s; uploads up to %d MB; %d inference worker(s), %d may wait",
                ", ".join(cors_origins) or "this server's own only", max_upload_bytes >> 20, infer_workers, infer_queue)
    logger.info("answering %s", "every client that logs in" if login else
                f"clients on this machine and on {', '.join(map(str, networks))} only" if networks else
                "clients on this machine only (others get a 403: MONAI_LABEL_AUTH_ENABLE for a login, or --conf "
                "trusted_networks)")
    for name in ("monailabel.tasks.infer.basic_infer", "monailabel.interfaces.app", "monailabel.endpoints.infer"):
        logging.getLogger(name).addFilter(RedactReports())


class RedactReports(logging.Filter):
    """Report texts are patient data: log lines that print a request show their length instead."""

    PATTERN = re.compile(r"""(['"](?:report|text|text_used)['"]:\s*)(['"])(.*?)(?<!\\)\2""")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.PATTERN.sub(lambda m: f"{m.group(1)}'<{len(m.group(3))} characters>'", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
