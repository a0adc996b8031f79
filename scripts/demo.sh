#!/usr/bin/env bash
# The main job on the sample data: pretrain the diffusion backbone on the unlabeled pool, train TextDiff on the
# 20 labeled images, evaluate on the held-out test split and write masks + overlays. Outputs go to runs/demo/.
# PRETRAIN_EPOCHS (default 60, ~26 min on 2 CPU cores) and TRAIN_EPOCHS (default 40) shorten it for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=runs/demo
mkdir -p "$out"
[ -f "$out/backbone/unet/config.json" ] || textdiff pretrain --data sample-data/train --out "$out/backbone" \
  --epochs "${PRETRAIN_EPOCHS:-60}" --batch-size 8 --lr 3e-4 --set backbone.max_windows=1  # whole radiographs, one window
textdiff train --data sample-data/train --backbone "$out/backbone" --out "$out/textdiff.pt" --epochs "${TRAIN_EPOCHS:-40}"
textdiff evaluate --model "$out/textdiff.pt" --data sample-data/test --out "$out/evaluation.json"
textdiff predict --model "$out/textdiff.pt" --images sample-data/test --out "$out/predictions" > /dev/null
echo "masks and overlays in $out/predictions, per-image Dice/IoU in $out/evaluation.json"
