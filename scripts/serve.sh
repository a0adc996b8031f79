#!/usr/bin/env bash
# The main job: set up .venv and serve TextDiff Label on the sample data at http://127.0.0.1:8000 for 3D Slicer and
# OHIF. On first start the app copies its demo weights (apps/textdiff/demo/, made from sample-data by the commands in
# docs/app.md) into apps/textdiff/model/, so /info lists a ready `textdiff` model at once.
# STUDIES, PORT and extra `--conf key value` arguments can be changed: bash scripts/serve.sh --conf epochs 50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# `monailabel start_server` runs the first `python` on PATH and starts train jobs with it: it must be the venv's.
export PATH="$PWD/.venv/bin:$PATH"
exec monailabel start_server --app apps/textdiff --studies "${STUDIES:-sample-data/train}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
