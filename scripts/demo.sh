#!/usr/bin/env bash
# The library pipeline on the sample data: pretrain the diffusion backbone on the unlabeled pool, train TextDiff on
# the 20 labeled images, evaluate on the held-out test split and write masks + overlays. Outputs go to runs/demo/.
# PRETRAIN_EPOCHS (default 60, ~26 min on 2 CPU cores) and TRAIN_EPOCHS (default 40) can be changed.
# QUICK=1 skips pretraining and trains on the shipped demo backbone instead (a few minutes on 2 CPU cores): a few
# epochs of pretraining from scratch give a backbone whose features show nothing yet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=runs/demo
mkdir -p "$out"
if [ "${QUICK:-0}" = 1 ]; then
  backbone=apps/textdiff/demo/backbones/sample-data
  echo "QUICK=1: training the head on the shipped demo backbone ($backbone)"
else
  backbone="$out/backbone"
  [ -f "$backbone/unet/config.json" ] || textdiff pretrain --data sample-data/train --out "$backbone" \
    --epochs "${PRETRAIN_EPOCHS:-60}" --batch-size 8 --lr 3e-4 --set backbone.max_windows=1  # whole radiographs
fi
textdiff train --data sample-data/train --backbone "$backbone" --out "$out/textdiff.pt" --epochs "${TRAIN_EPOCHS:-40}"
textdiff evaluate --model "$out/textdiff.pt" --data sample-data/test --out "$out/evaluation.json"
textdiff predict --model "$out/textdiff.pt" --images sample-data/test --out "$out/predictions" > /dev/null
dice=$(python -c "import json; print(round(json.load(open('$out/evaluation.json'))['mean']['dice'], 3))")
echo "test Dice $dice; masks and overlays in $out/predictions, per-image Dice/IoU in $out/evaluation.json"
if python -c "import sys; sys.exit(0 if $dice < 0.3 else 1)"; then
  echo "warning: a Dice of $dice means the model draws little: pretrain longer (PRETRAIN_EPOCHS, a GPU helps) or" \
       "run QUICK=1 bash scripts/demo.sh to train on the shipped backbone" >&2
fi
