"""The labeling loop through the app's REST API on an imported data set (e.g. MoNuSeg), scored against the CLI.

    python benchmarks/scripts/rest_loop.py --data runs/monuseg --labels nucleus --backbone runs/monuseg/backbone --out runs/rest

Copies <data>/train (images, final masks, reports) into a fresh studies folder, starts `monailabel start_server` on
127.0.0.1, pretrains the backbone over REST when no --backbone is given (POST /train/diffusion_pretrain), trains the
head (POST /train/textdiff), uploads and segments every image of <data>/test with its report (POST /infer/textdiff),
scores Dice and IoU against the test masks, and scores the model the server published with `textdiff evaluate`.
Both go to <out>/rest_loop.json: the same weights must give the same Dice either way. With --add-label, one more
mask is submitted after the first training and the head trained again (the retrain after a new label). With
--busy-infer, one test image is also segmented over and over while the server is idle, while a background head
training runs and while a background scoring job runs: the seconds each request took go to rest_loop.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from textdiff.data.studies import read_2d, read_studies
from textdiff.evaluation import score_masks

APP = Path(__file__).resolve().parents[2] / "apps" / "textdiff"


def start_server(studies: Path, model_dir: Path, port: int, conf: dict[str, str], log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(port), "--conf", "model_dir", str(model_dir)]
    for key, value in conf.items():
        args += ["--conf", key, value]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    server = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                return server
        except requests.ConnectionError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: see {log}")
        time.sleep(1)
    server.terminate()
    raise SystemExit(f"the server did not answer in 10 minutes: see {log}")


def train(url: str, model: str, params: dict) -> dict:
    start = time.perf_counter()
    response = requests.post(f"{url}/train/{model}?run_sync=true", json=params, timeout=24 * 3600)
    response.raise_for_status()
    seconds = time.perf_counter() - start
    print(f"POST /train/{model} {params}: {seconds:.0f} s", flush=True)
    return {**requests.get(f"{url}/info/", timeout=60).json()["train_stats"][model], "request_seconds": seconds}


def submit_label(url: str, mask: Path) -> None:
    """Save `mask` as the final label of the image with its name, as Slicer's Submit Label does."""
    with open(mask, "rb") as handle:
        response = requests.put(f"{url}/datastore/label?image={mask.name.split('.')[0]}&tag=final",
                                files={"label": (mask.name, handle)}, timeout=600)
    response.raise_for_status()


def given(**params) -> dict:
    """The train params set on the command line (the others keep the app's defaults)."""
    return {name: value for name, value in params.items() if value is not None}


def segment_over_rest(url: str, test: Path) -> tuple[list[torch.Tensor], list[dict], float]:
    """Every test image uploaded and segmented with its report; the masks, the items to score them and seconds."""
    masks, items, start = [], [], time.perf_counter()
    for case in read_studies(test):
        params = {"text": case.report, "result_extension": ".png", "result_dtype": "uint8"}
        with open(case.image, "rb") as handle:
            response = requests.post(f"{url}/infer/textdiff?output=image", files={"file": (case.image.name, handle)},
                                     data={"params": json.dumps(params)}, timeout=3600)
        response.raise_for_status()
        with tempfile.NamedTemporaryFile(suffix=".png") as out:
            out.write(response.content)
            out.flush()
            masks.append(torch.as_tensor(np.asarray(Image.open(out.name))).T[None].to(torch.uint8))  # (1, X, Y)
        items.append({"id": case.id, "original_label": read_2d(case.label, "mask").long()})
        print(f"  {case.id}: {int(masks[-1].sum())} foreground pixels", flush=True)
    return masks, items, time.perf_counter() - start


def infer_seconds(url: str, image: Path) -> float:
    """Seconds of one POST /infer/textdiff of `image` (its mask returned as a PNG)."""
    start = time.perf_counter()
    with open(image, "rb") as handle:
        response = requests.post(f"{url}/infer/textdiff?output=image", files={"file": (image.name, handle)},
                                 data={"params": json.dumps({"result_extension": ".png"})}, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - start


def busy_infer(url: str, image: Path, repeats: int = 10, pause: float = 2.0) -> dict:
    """Seconds per POST /infer/textdiff of one image, `pause` seconds apart (a person looks at each mask): idle,
    while a background head training runs (as Slicer's Train button starts it) and while a background scoring job
    runs, each until its job ends; and how long each job took."""
    result = {"idle": [infer_seconds(url, image) for _ in range(repeats)]}
    for job, path in (("train", "train/textdiff"), ("scoring", "scoring/textdiff_uncertainty")):
        start = time.perf_counter()
        requests.post(f"{url}/{path}", json={}, timeout=60).raise_for_status()
        time.sleep(5)  # the job's process has started and is loading
        seconds = []
        while requests.get(f"{url}/{path.split('/')[0]}/?check_if_running=true", timeout=60).ok:
            seconds.append(infer_seconds(url, image))
            time.sleep(pause)
        result[f"during {job}"] = seconds
        result[f"{job} seconds"] = time.perf_counter() - start
        print(f"infer during {job} ({result[f'{job} seconds']:.0f} s): {len(seconds)} requests, median "
              f"{np.median(seconds or [0]):.2f} s, max {max(seconds or [0]):.2f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train/ and test/ studies folders")
    parser.add_argument("--labels", default="nucleus", help="--conf labels of the app")
    parser.add_argument("--backbone", help="a pretrained backbone folder (default: pretrain one over REST)")
    parser.add_argument("--pretrain-minutes", type=float, help="pretraining budget (default: the app's)")
    parser.add_argument("--pretrain-epochs", type=int, help="at most this many pretraining epochs (default: the app's)")
    parser.add_argument("--steps", type=int, help="head optimizer steps of POST /train/textdiff (default: the app's)")
    parser.add_argument("--epochs", type=int, help="head epochs of POST /train/textdiff instead of steps")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="another --conf of the server, e.g. --conf epochs 100")
    parser.add_argument("--add-label", type=Path, help="a mask file (its name: the image id) submitted after the first "
                        "training, then POST /train/textdiff again: the retrain after one more label")
    parser.add_argument("--busy-infer", action="store_true", help="also time POST /infer/textdiff of one test image "
                        "idle and while a background training and a scoring job run")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    studies, model_dir = args.out / "studies", args.out / "model"
    shutil.rmtree(studies, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(args.data / "train", studies)
    conf = {"demo_weights": "false", "labels": args.labels, "healthy_label": "", **dict(args.conf)}
    if args.backbone:
        conf["backbone"] = str(Path(args.backbone).resolve())
    server = start_server(studies, model_dir, args.port, conf, args.out / "server.log")
    url = f"http://127.0.0.1:{args.port}"
    try:
        result = {"labels": args.labels, "backbone": args.backbone}
        if not args.backbone:
            result["pretrain"] = train(url, "diffusion_pretrain", given(max_epochs=args.pretrain_epochs,
                                                                        max_minutes=args.pretrain_minutes))
        result["train"] = train(url, "textdiff", given(max_steps=args.steps, max_epochs=args.epochs))
        if args.add_label:
            submit_label(url, args.add_label)
            result["retrain"] = train(url, "textdiff", given(max_steps=args.steps, max_epochs=args.epochs))
        masks, items, seconds = segment_over_rest(url, args.data / "test")
        if args.busy_infer:
            cases = read_studies(args.data / "test")
            result["busy_infer"] = busy_infer(url, cases[len(cases) // 2].image)
    finally:
        server.terminate()
        server.wait(60)
    result["rest"] = {**score_masks(masks, items, 2)["mean"], "seconds": seconds, "images": len(items)}
    cli = subprocess.run([sys.executable, "-m", "textdiff.cli", "evaluate", "--model", str(model_dir / "textdiff.pt"),
                          "--data", str(args.data / "test"), "--device", "cpu"], capture_output=True, text=True, check=True)
    result["cli"] = json.loads(cli.stdout.strip().splitlines()[-1])
    for part in ("train", "pretrain", "retrain"):
        result.get(part, {}).pop("history", None)
    (args.out / "rest_loop.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"rest": result["rest"], "cli": result["cli"]}, indent=1))


if __name__ == "__main__":
    main()
