#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned requirements and the textdiff package; safe to run again. It does the
# work only when .venv is missing or what it was made from changed (requirements, pyproject, this script): a
# second run, such as every start of scripts/serve.sh, returns at once and needs no network. It also installs the OHIF
# viewer the app serves at /viewer/ (scripts/install_ohif.py: a pinned npm package, no build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/install_ohif.py || echo "warning: without OHIF the server has no /viewer/ (the rest works)" >&2
STAMP=.venv/.setup-done
wanted=$(cat requirements.txt pyproject.toml benchmarks/pyproject.toml scripts/setup.sh scripts/system-packages.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi
bash scripts/system-packages.sh || echo "warning: without these the PACS and OHIF tests fail (the rest works)" >&2
PYTHON=${PYTHON:-python3.11}
NEED_GIB=10  # the venv takes about 8.7 GiB (torch's CUDA build and its nvidia wheels, itk)
if [ ! -x .venv/bin/python ]; then
  free_gib=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$free_gib" -lt "$NEED_GIB" ]; then
    echo "error: $free_gib GiB free on $(df -P . | awk 'NR==2 {print $6}'), the environment needs about $NEED_GIB GiB." \
         "Free some space (old clones' .venv folders are the usual culprit) and run this again." >&2
    exit 1
  fi
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e . -e benchmarks  # the library, and the benchmarks apart from it
.venv/bin/python -c "import textdiff, textdiff_bench, monailabel, monai, diffusers, transformers; print('textdiff environment ready')"
echo "$wanted" > "$STAMP"
