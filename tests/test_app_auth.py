"""Login on a real server: a small OpenID realm started here signs the tokens (as Keycloak would: the realm URL
answers its public key), and MONAI Label's roles decide who may infer, label, train and replace the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import make_deployment, openid_realm, running_server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def realm():
    with openid_realm() as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory, h, realm):
    root = tmp_path_factory.mktemp("auth")
    deployment = make_deployment(root, h.tiny_config)
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm[0]}
    with running_server(root, deployment, env=env) as running:
        yield {"url": running.url, **deployment}


def test_without_a_valid_token_every_endpoint_answers_401(server, realm):
    url, token = server["url"], realm[1]
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for headers in ({}, token("eve", "monailabel-admin", signer=stranger),
                    token("old", "monailabel-admin", expires_in=-60), {"Authorization": "Bearer not-a-jwt"}):
        assert requests.get(f"{url}/info/", headers=headers, timeout=30).status_code == 401
        assert requests.post(f"{url}/infer/textdiff?image=case_0001", headers=headers, timeout=30).status_code == 401
        assert requests.post(f"{url}/train/textdiff", json={}, headers=headers, timeout=30).status_code == 401


def test_an_annotator_infers_and_labels_but_may_not_train_or_touch_the_model(server, realm):
    url = server["url"]
    annotator = realm[1]("ann", "monailabel-annotator", "monailabel-user")
    assert requests.get(f"{url}/info/", headers=annotator, timeout=30).status_code == 200
    mask = requests.post(f"{url}/infer/textdiff?image=case_0004&output=image", headers=annotator, timeout=120)
    assert mask.status_code == 200, mask.text
    saved = requests.put(f"{url}/datastore/label?image=case_0004", headers=annotator, timeout=30,
                         files={"label": ("case_0004.png", mask.content)})
    assert saved.status_code == 200, saved.text
    checkpoint = (server["model_dir"] / "textdiff.pt").read_bytes()
    for method, path, kwargs in (("POST", "/train/textdiff", {"json": {}}),
                                 ("PUT", "/model/textdiff", {"files": {"file": ("m.pt", checkpoint)}}),
                                 ("DELETE", "/model/textdiff", {}), ("POST", "/model/textdiff/rollback", {}),
                                 ("GET", "/model/textdiff", {}), ("GET", "/logs/", {})):
        answer = requests.request(method, url + path, headers=annotator, timeout=30, **kwargs)
        assert answer.status_code == 403, (method, path, answer.status_code, answer.text[:200])
    assert (server["model_dir"] / "textdiff.pt").read_bytes() == checkpoint


def test_an_admin_may_train_and_replace_the_model(server, realm):
    url = server["url"]
    admin = realm[1]("root", "monailabel-admin", "monailabel-annotator", "monailabel-user")
    trained = requests.post(f"{url}/train/textdiff?run_sync=true", json={"max_epochs": 1}, headers=admin, timeout=600)
    assert trained.status_code == 200, trained.text
    checkpoint = (server["model_dir"] / "textdiff.pt").read_bytes()
    replaced = requests.put(f"{url}/model/textdiff?force=true", files={"file": ("m.pt", checkpoint)}, headers=admin,
                            timeout=120)
    assert replaced.status_code == 200 and replaced.json()["published"], replaced.text
    assert requests.get(f"{url}/logs/?text=true", headers=admin, timeout=30).status_code == 200


def test_a_browser_logs_in_with_a_form_and_its_cookie_carries_the_login(server):
    """`/login` asks the realm for a token (password grant) and keeps it in an HttpOnly, SameSite=Strict cookie: the
    pages and API calls of that browser are then the user's, with the user's roles; a page without a login sends
    the browser to the login form, and it comes back only to a path on this server."""
    url = server["url"]
    browser = requests.Session()
    page = browser.get(f"{url}/labeling/", allow_redirects=False, timeout=30)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Flabeling%2F"
    assert "Password" in browser.get(f"{url}/login?next=/labeling/", timeout=30).text
    wrong = browser.post(f"{url}/login", data={"username": "ann", "password": "nope"}, allow_redirects=False, timeout=30)
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text and not browser.cookies
    good = browser.post(f"{url}/login", data={"username": "ann", "password": "ann-pass", "next": "//elsewhere.example"},
                        allow_redirects=False, timeout=30)
    assert good.status_code == 303 and good.headers["location"] == "/labeling/"  # never another site
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert browser.get(f"{url}/info/", timeout=30).status_code == 200
    assert browser.post(f"{url}/train/textdiff", json={}, timeout=30).status_code == 403  # an annotator's roles
    browser.post(f"{url}/logout", timeout=30)
    assert browser.get(f"{url}/info/", timeout=30).status_code == 401
