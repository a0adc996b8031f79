#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned requirements and the textdiff package; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh || echo "warning: without these the PACS and OHIF tests fail (the rest works)" >&2
PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c "import textdiff, monailabel, monai, diffusers, transformers; print('textdiff environment ready')"
