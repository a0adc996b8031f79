"""What this machine's CPU computes natively, for the paths that choose their precision by it (serving, pretraining)."""

from __future__ import annotations

import functools
import re
from pathlib import Path


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere bfloat16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
