#!/usr/bin/env bash
# Remake the shipped demo backbone (apps/textdiff/demo/backbones/sample-data): a UNet twice as wide as the CPU-sized
# default (channels 32-64-128-256, 10.7 M parameters), DDPM-pretrained on the 70 sample training images plus 1200
# more unlabeled ones from the generator, 100 epochs of batch 32, stored in float16 (21 MB). Meant for a GPU: about
# 6 minutes on one H200 (shared with two other pretraining runs); hours on a CPU.
# Run with the textdiff environment active (bash scripts/setup.sh; source .venv/bin/activate); EPOCHS=1 for a
# quick check.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo-weights/backbones/sample-data}  # copy into apps/textdiff/demo/ to ship it
UNLABELED=${UNLABELED:-runs/unlabeled}
for seed in $(seq 101 112); do  # 12 x 100 images, in parallel (one thread each)
  [ -d "$UNLABELED/$seed/train" ] || OMP_NUM_THREADS=1 textdiff make-sample-data --out "$UNLABELED/$seed" --seed "$seed" \
    --train 100 --test 0 --labeled 0 > /dev/null &
done
wait
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} textdiff pretrain --data sample-data/train "$UNLABELED"/*/train --out "$OUT" \
  --epochs "${EPOCHS:-100}" --batch-size 32 --lr 3e-4 --half --set "backbone.block_out_channels=[32,64,128,256]" \
  backbone.max_windows=1  # every image resized into one 128² window (recorded in tiling.json)
