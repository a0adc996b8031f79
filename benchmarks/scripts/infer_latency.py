"""Median wall time of POST /infer/textdiff on a running server, the way Slicer asks (NRRD, uint8); with
--concurrent N, also N requests sent at once: their total time, and how long GET /info/ takes meanwhile.

    python benchmarks/scripts/infer_latency.py --url http://127.0.0.1:8000 --image case_0000 --repeat 10 --concurrent 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", default="case_0000")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=0, help="then send this many requests at once")
    args = parser.parse_args()
    infer(args.url, args.image)  # warm-up
    seconds = [infer(args.url, args.image) for _ in range(args.repeat)]
    print(f"POST /infer/textdiff?image={args.image}: median {statistics.median(seconds):.3f} s over {args.repeat} "
          f"requests (min {min(seconds):.3f}, max {max(seconds):.3f})")
    if args.concurrent:
        total, info = concurrent(args.url, args.image, args.concurrent)
        print(f"{args.concurrent} at once: all answered after {total:.2f} s "
              f"({total / statistics.median(seconds):.1f} x the sequential median); GET /info/ meanwhile: median "
              f"{1000 * statistics.median(info):.0f} ms, max {1000 * max(info):.0f} ms over {len(info)} requests")


def infer(url: str, image: str) -> float:
    """Seconds for one infer as Slicer asks it."""
    params = json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/textdiff?image={image}", data={"params": params}, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


def concurrent(url: str, image: str, count: int) -> tuple[float, list[float]]:
    """Seconds until `count` simultaneous infers have all answered, and GET /info/ times while they run."""
    workers = [threading.Thread(target=infer, args=(url, image)) for _ in range(count)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    info = []
    while any(worker.is_alive() for worker in workers):
        asked = time.perf_counter()
        requests.get(f"{url}/info/", timeout=60).raise_for_status()
        info.append(time.perf_counter() - asked)
        time.sleep(0.1)
    for worker in workers:
        worker.join()
    return time.perf_counter() - start, info


if __name__ == "__main__":
    main()
