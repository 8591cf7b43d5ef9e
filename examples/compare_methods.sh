#!/usr/bin/env bash
# Full fine-tuning, head-only tuning and Med-Tuning of the same CPU-sized model on the same cases,
# evaluated on the same held-out slab and put side by side in the paper's table form.
# Usage: examples/compare_methods.sh OUT_DIR [MINUTES_PER_RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: examples/compare_methods.sh OUT_DIR [MINUTES_PER_RUN]}
MINUTES=${2:-3}
DATA=../shared/data
MT=".venv/bin/medtuning"
LIB="$OUT/library"
if [ ! -f "$LIB/cases.json" ]; then
  $MT cases add --library "$LIB" --id spleen-train-slab --split train --slices 0:16 \
    --image "$DATA/spleen-ct/ct.nii.gz" --modality CT --label "$DATA/spleen-ct/ct_seg.nii.gz"
  $MT cases add --library "$LIB" --id spleen-held-out-slab --split test --slices 16: \
    --image "$DATA/spleen-ct/ct.nii.gz" --modality CT --label "$DATA/spleen-ct/ct_seg.nii.gz"
fi
for method in full head med_tuning; do
  [ -d "$OUT/$method" ] || $MT train --library "$LIB" --out "$OUT/$method" --task custom --labels "Spleen=1" \
    --arch vit_unet --backbone vit_tiny_patch16_224 --backbone-args depth=4,patch_size=8 --decoder-width 16 \
    --method $method --weights none --crop 16x128x128 --batch 2 --epochs 200 --steps-per-epoch 4 \
    --minutes "$MINUTES" --val-every 10 --device cpu --seed 0
done
$MT compare "$OUT/full" "$OUT/head" "$OUT/med_tuning" --library "$LIB" --split test --out "$OUT/compare" --force
