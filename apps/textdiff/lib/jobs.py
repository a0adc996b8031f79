"""Background jobs yield the CPU to requests a person is waiting for.

MONAI Label runs train, scoring and batch-infer jobs (Slicer's and OHIF's Train button, the scoring after a model
update) in a process of their own, `python -m monailabel.interfaces.utils.app`. On a few cores such a job would
take every core from a `POST /infer/textdiff` that arrives meanwhile. In that process the job lowers its own CPU
priority: the kernel then runs the server's inference first and gives the job what is left, so an idle machine
still trains at full speed. A run with `run_sync=true` runs inside the server process and does not yield.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

JOB_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs as `python -m` for a background job


def in_job_process() -> bool:
    """True in the process MONAI Label started for a background job (not in the server, a test or a script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == JOB_MODULE


def yield_to_requests(niceness: int, threads: int) -> None:
    """In a background job's process: run at `niceness` (0-19; higher yields more) with `threads` torch threads (0:
    torch's default). Elsewhere nothing changes."""
    if not in_job_process():
        return
    if niceness > 0 and hasattr(os, "nice"):
        current = os.nice(0)
        if niceness > current:
            os.nice(niceness - current)
    if threads > 0:
        torch.set_num_threads(threads)
    logger.info("background job at CPU priority %d (nice), %d torch threads: requests to the server come first",
                os.nice(0) if hasattr(os, "nice") else 0, torch.get_num_threads())
