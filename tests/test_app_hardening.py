"""A real `monailabel start_server` under hostile and careless clients: every bad request gets a 4xx and changes no
file of the studies or model folders; inference does not block the server; a stopped, killed or worse training run
leaves the model in service as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import make_deployment, running_server  # noqa: E402

pytestmark = pytest.mark.slow
UPLOAD_PREFIXES = ("tmp", "upload-", "session-")  # what MONAI Label's and the app's temporary files start with


@pytest.fixture(scope="module")
def server(tmp_path_factory, h):
    root = tmp_path_factory.mktemp("hardened")
    deployment = make_deployment(root, h.tiny_config)
    with running_server(root, deployment, conf={"max_upload_mb": "1"}) as running:
        yield {"url": running.url, "pid": running.pid, "root": root, **deployment}


def folder_hashes(*folders: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_with(name: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"written outside"
        member = tarfile.TarInfo(name)
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def bad_requests(server: dict) -> list[tuple[str, str, str, dict, tuple[int, ...]]]:
    """(what, method, path, requests kwargs, accepted statuses) for each bad request."""
    case = (server["studies"] / "case_0001.png").read_bytes()
    other = png_bytes(40, 40)
    huge = png_bytes(13000, 13000)  # ~160 KB on disk, 169 M pixels once decoded
    escape = f"../../../..{tempfile.gettempdir()}/textdiff-escaped.txt"
    upload = Path(tempfile.gettempdir()) / "tmpabcdefgh.png"
    upload.write_bytes(case)  # a file named like an upload: infer must not read it
    long_id = "a" * 300
    return [
        ("archive member leaving its folder", "PUT", "/session/?uncompress=true",
         {"files": {"files": ("x.tar", tar_with(escape))}}, (422,)),
        ("archive member with an absolute path", "PUT", "/session/?uncompress=true",
         {"files": {"files": ("x.tar", tar_with("/tmp/textdiff-escaped.txt"))}}, (422,)),
        ("body over the upload limit", "PUT", "/datastore/image?image=big",
         {"files": {"file": ("big.png", b"0" * (2 << 20))}}, (413,)),
        ("13000x13000 PNG into the datastore", "PUT", "/datastore/image?image=huge",
         {"files": {"file": ("huge.png", huge)}}, (413,)),
        ("13000x13000 PNG to infer", "POST", "/infer/textdiff", {"files": {"file": ("huge.png", huge)}}, (413,)),
        ("existing id replaced silently", "PUT", "/datastore/image?image=case_0001",
         {"files": {"file": ("case_0001.png", other)}}, (409,)),
        ("upload with a bad report", "PUT", "/datastore/image?image=new_one",
         {"files": {"file": ("new_one.png", case)}, "data": {"params": json.dumps({"report": 5})}}, (422,)),
        ("infer on a temp file by path", "POST", f"/infer/textdiff?image={upload}", {}, (422,)),
        ("infer on a missing temp file", "POST", f"/infer/textdiff?image={upload}.gone", {}, (422,)),
        ("infer without an image", "POST", "/infer/textdiff", {}, (422,)),
        ("infer as dicom_seg", "POST", "/infer/textdiff?image=case_0001&output=dicom_seg", {}, (422,)),
        ("infer params a list", "POST", "/infer/textdiff?image=case_0001", {"data": {"params": "[1, 2]"}}, (422,)),
        ("infer params not JSON", "POST", "/infer/textdiff?image=case_0001", {"data": {"params": "{"}}, (422,)),
        ("image info a string", "PUT", "/datastore/image/info?image=case_0001", {"data": {"info": '"x"'}}, (422,)),
        ("label info of an unknown label", "PUT", "/datastore/label/info?label=nope&tag=final",
         {"data": {"info": "{}"}}, (404,)),
        ("image params a list", "PUT", "/datastore/image?image=listy",
         {"files": {"file": ("listy.png", case)}, "data": {"params": "[]"}}, (422,)),
        ("image info null", "PUT", "/datastore/image/info?image=case_0001", {"data": {"info": "null"}}, (422,)),
        ("label info a list", "PUT", "/datastore/label/info?label=case_0001&tag=final", {"data": {"info": "[1]"}},
         (422,)),
        ("train params a list", "POST", "/train/textdiff", {"json": [1]}, (422,)),
        ("session of a file that is no archive", "PUT", "/session/?uncompress=true",
         {"files": {"files": ("x.tar", b"plain text")}}, (422,)),
        ("label params a number", "PUT", "/datastore/label?image=case_0001",
         {"files": {"label": ("l.png", case)}, "data": {"params": "7"}}, (422,)),
        ("300-character id", "PUT", f"/datastore/image?image={long_id}", {"files": {"file": ("a.png", case)}},
         (422,)),
        ("infer on a 300-character id", "POST", f"/infer/textdiff?image={long_id}", {}, (422,)),
        ("max_epochs -1", "POST", "/train/textdiff", {"json": {"max_epochs": -1}}, (422,)),
        ("max_epochs abc", "POST", "/train/textdiff", {"json": {"max_epochs": "abc"}}, (422,)),
        ("learning_rate fast", "POST", "/train/textdiff?run_sync=true", {"json": {"learning_rate": "fast"}}, (422,)),
        ("train_batch_size 0", "POST", "/train/textdiff", {"json": {"train_batch_size": 0}}, (422,)),
        ("unknown train param", "POST", "/train/textdiff", {"json": {"epochz": 3}}, (422,)),
        ("volume_slices some", "POST", "/train/textdiff", {"json": {"volume_slices": "some"}}, (422,)),
        ("checkpoint first", "POST", "/train/textdiff", {"json": {"checkpoint": "first"}}, (422,)),
        ("intensity_copies 1000", "POST", "/train/textdiff", {"json": {"intensity_copies": 1000}}, (422,)),
        ("140 KB train param", "POST", "/train/textdiff", {"json": {"healthy_label": "x" * 140_000}}, (413,)),
        ("garbage model upload", "PUT", "/model/textdiff", {"files": {"file": ("m.pt", b"not a model")}}, (422,)),
        ("DICOM proxy without a PACS", "GET", "/proxy/dicom/qido/studies", {}, (404,)),
        ("whole-slide infer", "POST", "/infer/wsi/textdiff?image=case_0001", {"json": {}}, (404,)),
    ]


def test_bad_requests_get_a_4xx_and_change_no_file(server):
    url, folders = server["url"], (server["studies"], server["model_dir"])
    before = folder_hashes(*folders)
    temp_before = set(os.listdir(tempfile.gettempdir()))
    failures = []
    for what, method, path, kwargs, statuses in bad_requests(server):
        response = requests.request(method, url + path, timeout=120, **kwargs)
        if response.status_code not in statuses:
            failures.append(f"{what}: {response.status_code} {response.text[:200]}")
        assert requests.get(f"{url}/info/", timeout=10).status_code == 200, what
    assert not failures, "\n".join(failures)
    assert folder_hashes(*folders) == before
    assert not (Path(tempfile.gettempdir()) / "textdiff-escaped.txt").exists()
    left = {name for name in set(os.listdir(tempfile.gettempdir())) - temp_before
            if name.startswith(UPLOAD_PREFIXES) and name != "tmpabcdefgh.png"}
    assert not left, f"refused uploads left files behind: {left}"


def test_a_temp_file_is_refused_with_the_same_message_whether_it_exists_or_not(server):
    upload = Path(tempfile.gettempdir()) / "tmpzyxwvuts.png"
    upload.write_bytes((server["studies"] / "case_0001.png").read_bytes())
    answers = [requests.post(f"{server['url']}/infer/textdiff?image={path}", timeout=60)
               for path in (upload, upload.with_name("tmpnothere.png"))]
    assert [a.status_code for a in answers] == [422, 422]
    assert answers[0].json()["detail"].replace(upload.name, "X") == answers[1].json()["detail"].replace(
        "tmpnothere.png", "X")


def test_replacing_an_image_needs_overwrite_and_drops_its_old_label(server):
    url = server["url"]
    with open(server["studies"] / "case_0002.png", "rb") as handle:
        assert requests.put(f"{url}/datastore/image?image=spare", files={"file": ("spare.png", handle)},
                            timeout=30).status_code == 200
    assert requests.put(f"{url}/datastore/label?image=spare", timeout=30,
                        files={"label": ("spare.png", (server["studies"] / "labels" / "final" / "case_0002.png")
                                         .read_bytes())}).status_code == 200
    other = png_bytes(40, 40)
    refused = requests.put(f"{url}/datastore/image?image=spare", files={"file": ("spare.png", other)}, timeout=30)
    assert refused.status_code == 409
    replaced = requests.put(f"{url}/datastore/image?image=spare&overwrite=true",
                            files={"file": ("spare.png", other)}, timeout=30)
    assert replaced.status_code == 200, replaced.text
    labels = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]["spare"].get("labels", {})
    assert "final" not in labels
    assert requests.delete(f"{url}/datastore/image?id=spare", timeout=30).status_code == 200


def test_a_report_write_keeps_the_sidecar_s_line_endings_and_a_download_leaves_no_temp_file(server):
    url = server["url"]
    saved = requests.put(f"{url}/datastore/image/info?image=case_0003", timeout=30,
                         data={"info": json.dumps({"report": "Bilateral pulmonary infection, two infected areas."})})
    assert saved.status_code == 200, saved.text
    assert b"\r" not in (server["studies"] / "reports.csv").read_bytes()
    temp_before = set(os.listdir(tempfile.gettempdir()))
    archive = requests.get(f"{url}/datastore/dataset", timeout=60)
    assert archive.status_code == 200 and archive.content[:2] == b"PK"
    time.sleep(1)
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - temp_before if n.startswith(UPLOAD_PREFIXES)}


def test_cors_answers_only_configured_origins(server):
    response = requests.options(f"{server['url']}/info/", timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in {k.lower() for k in response.headers}


def test_a_real_server_answers_loopback_and_says_whom_it_answers(server):
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200
    logs = "".join(path.read_text(errors="replace") for path in server["root"].glob("server-*.log"))
    assert "answering clients on this machine only" in logs


def test_reports_stay_out_of_the_log(server):
    secret = "Patchy opacity in the left lower lobe of Jane Doe."
    assert requests.post(f"{server['url']}/infer/textdiff?image=case_0001&output=json", timeout=60,
                         data={"params": json.dumps({"text": secret})}).status_code == 200
    logs = "".join(path.read_text(errors="replace") for path in server["root"].glob("server-*.log"))
    logs += requests.get(f"{server['url']}/logs/?text=true&lines=2000", timeout=30).text
    assert "Patchy opacity" not in logs


def test_sixteen_concurrent_infers_while_info_answers_quickly(server):
    url = server["url"]

    def infer() -> requests.Response:
        return requests.post(f"{url}/infer/textdiff?image=case_0001&output=json", timeout=300)

    start = time.perf_counter()
    assert infer().status_code == 200
    sequential = time.perf_counter() - start
    results, info_times = [], []
    workers = [threading.Thread(target=lambda: results.append(infer())) for _ in range(16)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        asked = time.perf_counter()
        assert requests.get(f"{url}/info/", timeout=10).status_code == 200
        info_times.append(time.perf_counter() - asked)
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    assert [r.status_code for r in results] == [200] * 16
    assert sorted(info_times)[len(info_times) // 2] < 0.1 and max(info_times) < 0.5, info_times
    assert elapsed < 16 * sequential + 5, (elapsed, sequential)


def test_a_full_queue_answers_503_with_retry_after_and_cors_allows_configured_origins(tmp_path, h):
    deployment = make_deployment(tmp_path, h.tiny_config)
    viewer = "https://viewer.example.org"
    with running_server(tmp_path, deployment, conf={"infer_queue": "0", "cors_origins": viewer}) as running:
        allowed = requests.options(f"{running.url}/info/", timeout=10, headers={
            "Origin": viewer, "Access-Control-Request-Method": "GET"})
        assert allowed.headers.get("access-control-allow-origin") == viewer

        def infer() -> requests.Response:
            return requests.post(f"{running.url}/infer/textdiff?image=case_0001&output=json", timeout=300)

        results = []
        workers = [threading.Thread(target=lambda: results.append(infer())) for _ in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    codes = sorted(r.status_code for r in results)
    assert codes[0] == 200 and 503 in codes, codes
    assert all(r.headers.get("Retry-After") for r in results if r.status_code == 503)


def _mask_and_checkpoint(server) -> tuple[bytes, bytes]:
    mask = requests.post(f"{server['url']}/infer/textdiff?image=case_0001&output=image", timeout=120)
    assert mask.status_code == 200, mask.text
    return mask.content, (server["model_dir"] / "textdiff.pt").read_bytes()


def _train_job_pids(server_pid: int) -> list[int]:
    """The server's child processes that run a train job (MONAI Label starts each job as `... -m train ...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == server_pid and b"train" in command:
                pids.append(int(entry.name))
    return pids


def _wait_for_training(url: str, running: bool, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        status = requests.get(f"{url}/train/", timeout=30).json()
        if (status.get("status") == "RUNNING") == running:
            return status
        time.sleep(0.5)
    pytest.fail(f"training did not {'start' if running else 'end'}: {status}")


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_an_interrupted_run_leaves_the_model_in_service_as_it_was(server, how):
    url = server["url"]
    before = _mask_and_checkpoint(server)
    answers = []
    both = [threading.Thread(target=lambda: answers.append(
        requests.post(f"{url}/train/textdiff", json={"max_epochs": 100000}, timeout=30))) for _ in range(2)]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    _wait_for_training(url, running=True)
    time.sleep(float(np.random.default_rng().uniform(2, 6)))  # some epochs in
    if how == "killed":
        pids = _train_job_pids(server["pid"])
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    else:
        assert requests.delete(f"{url}/train/", timeout=30).status_code == 200
    _wait_for_training(url, running=False)
    assert _mask_and_checkpoint(server) == before


def _label_bright_areas(server) -> None:
    """Masks a tiny model learns in seconds (the brighter half of each labeled image), saved as a client would."""
    for label in sorted((server["studies"] / "labels" / "final").glob("*.png")):
        image = np.asarray(Image.open(server["studies"] / label.name).convert("L"), dtype=float)
        buffer = io.BytesIO()
        Image.fromarray((image > np.median(image)).astype(np.uint8)).save(buffer, format="PNG")
        saved = requests.put(f"{server['url']}/datastore/label?image={label.stem}", timeout=30,
                             files={"label": (label.name, buffer.getvalue())})
        assert saved.status_code == 200, saved.text


def test_a_worse_run_is_not_published_a_better_one_is_and_one_request_rolls_back(server):
    url, checkpoint = server["url"], server["model_dir"] / "textdiff.pt"
    _label_bright_areas(server)
    original = checkpoint.read_bytes()
    good = requests.post(f"{url}/train/textdiff?run_sync=true", timeout=600,
                         json={"max_epochs": 150, "learning_rate": 0.01, "force": True})
    assert good.status_code == 200, good.text
    assert good.json()["published"] and checkpoint.read_bytes() != original, good.json()
    trained = checkpoint.read_bytes()
    bad = requests.post(f"{url}/train/textdiff?run_sync=true", timeout=600,
                        json={"max_epochs": 1, "learning_rate": 1e-9, "continue_from_current": False})
    assert bad.status_code == 200, bad.text
    stats = bad.json()
    assert stats["validation_dice"] < stats["current_validation_dice"], stats
    assert not stats["published"] and checkpoint.read_bytes() == trained
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["train_stats"]["textdiff"]["published"] is False
    assert requests.post(f"{url}/model/textdiff/rollback", timeout=30).status_code == 200
    assert checkpoint.read_bytes() == original
    assert requests.post(f"{url}/model/textdiff/rollback", timeout=30).status_code == 200
    assert checkpoint.read_bytes() == trained
    worse = (server["model_dir"] / "textdiff.candidate.pt").read_bytes()
    refused = requests.put(f"{url}/model/textdiff", files={"file": ("m.pt", worse)}, timeout=120)
    assert refused.status_code == 200 and not refused.json()["published"] and checkpoint.read_bytes() == trained
    forced = requests.put(f"{url}/model/textdiff?force=true", files={"file": ("m.pt", worse)}, timeout=120)
    assert forced.status_code == 200 and forced.json()["published"] and checkpoint.read_bytes() == worse
    assert requests.post(f"{url}/model/textdiff/rollback", timeout=30).status_code == 200
    assert checkpoint.read_bytes() == trained
    assert requests.delete(f"{url}/model/textdiff", timeout=30).status_code == 200
    assert requests.post(f"{url}/infer/textdiff?image=case_0001", timeout=30).status_code == 404
    assert requests.post(f"{url}/model/textdiff/rollback", timeout=30).status_code == 200
    assert checkpoint.read_bytes() == trained
    assert requests.post(f"{url}/infer/textdiff?image=case_0001", timeout=60).status_code == 200
