"""Median wall time of POST /infer/textdiff on a running server, the way Slicer asks (NRRD, uint8).

    python scripts/infer_latency.py --url http://127.0.0.1:8000 --image case_0000 --repeat 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", default="case_0000")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    params = json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})
    requests.post(f"{args.url}/infer/textdiff?image={args.image}", data={"params": params}, timeout=300)  # warm-up
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        response = requests.post(f"{args.url}/infer/textdiff?image={args.image}", data={"params": params}, timeout=300)
        response.raise_for_status()
        seconds.append(time.perf_counter() - start)
    print(f"POST /infer/textdiff?image={args.image}: median {statistics.median(seconds):.3f} s over {args.repeat} "
          f"requests (min {min(seconds):.3f}, max {max(seconds):.3f})")


if __name__ == "__main__":
    main()
