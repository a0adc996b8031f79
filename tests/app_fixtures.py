"""Build a tiny TextDiff Label deployment (studies folder, tiny backbone, tiny trained head) for the app tests."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
from textdiff.data.studies import read_studies
from textdiff.data.sample_data import make_sample_data
from textdiff.training.runs import train_on_cases

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "textdiff"


def make_deployment(root: Path, tiny_config) -> dict:
    """studies/ (6 images, 4 labeled, reports.csv), model/ (tiny backbone + head), and the app's --conf."""
    data = root / "data"
    make_sample_data(data, n_train=6, n_test=1, n_labeled=4, size=64)
    studies = root / "studies"
    shutil.copytree(data / "train", studies)
    model_dir = root / "model"
    cfg = tiny_config()
    backbone = model_dir / "backbones" / "tiny"
    save_diffusion(build_unet(cfg.backbone), build_scheduler(cfg.backbone), backbone)
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=str(backbone)),
                              train=dataclasses.replace(cfg.train, epochs=1))
    train_on_cases(read_studies(studies), cfg, model_dir / "textdiff.pt", progress=False)
    conf = {"model_dir": str(model_dir), "demo_weights": "false", "epochs": "30", "pretrain_epochs": "1",
            "pretrain_batch_size": "4", "image_size": "32"}
    return {"studies": studies, "model_dir": model_dir, "conf": conf, "groundtruth": data / "train-groundtruth",
            "conf_json": json.dumps(conf)}


@dataclasses.dataclass
class Server:
    url: str
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(root: Path, deployment: dict, env: dict | None = None, conf: dict | None = None):
    """A real `monailabel start_server` on 127.0.0.1 for `deployment`, as the README starts it; yields its URL and
    process id (its background jobs are its child processes)."""
    port = free_port()
    venv_bin = Path(sys.executable).parent
    args = [arg for key, value in {**deployment["conf"], **(conf or {})}.items() for arg in ("--conf", key, value)]
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TEXTDIFF_TEST_THREADS": "1", **(env or {})}
    log_path = root / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(venv_bin / "monailabel"), "start_server", "--app", str(APP_DIR), "--studies",
             str(deployment["studies"]), "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(process, url, log_path)
            yield Server(url, process.pid)
        finally:
            process.terminate()
            process.wait(30)


def wait_until_serving(process, url: str, log: Path, seconds: float = 240) -> None:
    """Wait for a started `monailabel start_server` to answer /info/; fail with its log if it dies or hangs."""
    import pytest
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code in (200, 401):  # 401: serving, with login
                return
        except requests.ConnectionError:
            pass
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    pytest.fail("server did not start: " + log.read_text()[-3000:])


@contextlib.contextmanager
def in_process_client(deployment: dict):
    """A fastapi TestClient on the app served from `deployment`, as MONAI Label's own tests build one."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(deployment["studies"])
    settings.MONAI_LABEL_APP_CONF = deployment["conf"]
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    clear_cache()
    from monailabel.app import app

    with TestClient(app) as test_client:
        yield test_client
    clear_cache()


def serve_a_mask_through(backbone: Path, root: Path) -> dict:
    """A new deployment on `--conf backbone` (a guided-diffusion file, a pipeline or a bundle folder): the head
    trained once over REST on 3 labeled sample images, then one image segmented; the infer response's JSON."""
    make_sample_data(root / "data", n_train=4, n_test=1, n_labeled=3, size=64)
    conf = {"model_dir": str(root / "model"), "demo_weights": "false", "backbone": str(backbone),
            "labels": "infection", "epochs": "1"}
    with in_process_client({"studies": root / "data" / "train", "conf": conf}) as client:
        trained = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1})
        assert trained.status_code == 200, trained.text
        response = client.post("/infer/textdiff?image=case_0003&output=json")
        assert response.status_code == 200, response.text
        return response.json()


REALM_PATH = "/realms/monailabel"
# the test realm's users: password and roles (MONAI Label's role names)
REALM_USERS = {"ann": ("ann-pass", ["monailabel-annotator", "monailabel-user"]),
               "viewer": ("viewer-pass", ["monailabel-user"]),
               "root": ("root-pass", ["monailabel-admin", "monailabel-annotator", "monailabel-user"])}


@contextlib.contextmanager
def openid_realm():
    """A small OpenID realm on loopback, as Keycloak serves one: its RS256 public key at the realm URL, its token
    endpoint in /.well-known/openid-configuration, and password logins of `REALM_USERS`. Yields (realm URL, token
    maker): `token(user, *roles, signer=, expires_in=)` gives Authorization headers without a login."""
    import base64
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def signed(user: str, roles: list[str], signer=key, expires_in: float = 600) -> str:
        claims = {"preferred_username": user, "realm_access": {"roles": list(roles)}, "exp": int(time.time() + expires_in)}
        return jwt.encode(claims, signer, algorithm="RS256")

    class Realm(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def do_GET(self):  # noqa: N802 - the http.server interface
            if self.path.rstrip("/") == REALM_PATH:
                return self._answer(200, {"realm": "monailabel", "public_key": base64.b64encode(public).decode()})
            if self.path == f"{REALM_PATH}/.well-known/openid-configuration":
                return self._answer(200, {"issuer": url, "token_endpoint": f"{url}/protocol/openid-connect/token"})
            return self._answer(404, {})

        def do_POST(self):  # noqa: N802
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
            password, roles = REALM_USERS.get(form.get("username"), (None, []))
            if self.path != f"{REALM_PATH}/protocol/openid-connect/token" or form.get("grant_type") != "password":
                return self._answer(400, {"error": "unsupported_grant_type"})
            if password is None or form.get("password") != password:
                return self._answer(401, {"error": "invalid_grant"})
            self._answer(200, {"access_token": signed(form["username"], roles), "token_type": "Bearer",
                               "expires_in": 600})

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Realm)
    url = f"http://127.0.0.1:{httpd.server_address[1]}{REALM_PATH}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def token(user: str, *roles: str, signer=key, expires_in: float = 600) -> dict:
        return {"Authorization": f"Bearer {signed(user, list(roles), signer, expires_in)}"}

    try:
        yield url, token
    finally:
        httpd.shutdown()
