#!/usr/bin/env bash
# What a working spacing costs in Dice and gains in time: one model trained on the scan's native grid and one
# trained at a 1.5 mm working spacing, same data, same settings, the same number of steps, scored on the same held-out slab.
# Usage: examples/spacing_cost.sh OUT_DIR [EPOCHS] [MINUTES_CEILING] [VAL_EVERY]
#
# Data: the shared abdominal CT (TotalSegmentator example, 3 mm, kidney labels 2 and 3) resampled onto a
# clinical grid (512x512x200 at 0.72x0.72x1.68 mm, linear / nearest), as bench peers uses it. Its detail is the
# 3 mm scan's: the fine grid is a scanner's grid, not a scanner's resolution. Slices 0:154 train (the 3 mm
# protocol's 0:86 of examples/real_data.sh), 154:200 are held out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: examples/spacing_cost.sh OUT_DIR [EPOCHS] [MINUTES_CEILING] [VAL_EVERY]}
EPOCHS=${2:-50}  # 4 steps each: the same number of steps for both models
MINUTES=${3:-20}  # a ceiling
VAL_EVERY=${4:-10}  # validating on the 512x512 grid is costly at native spacing
DATA=../shared/data/abdomen-ct-mr
MT=".venv/bin/medtuning"
PY=".venv/bin/python"
mkdir -p "$OUT"
# The real-data runs' CPU-sized model (a 4-block ViT-Tiny with 8-pixel patches, U-Net decoder), Med-Tuning.
MODEL=(--arch vit_unet --backbone vit_tiny_patch16_224 --backbone-args depth=4,patch_size=8 --decoder-width 16
       --method med_tuning --weights none --crop 16x128x128 --batch 2 --epochs "$EPOCHS" --steps-per-epoch 4
       --minutes "$MINUTES" --val-every "$VAL_EVERY" --device cpu --seed 0 --task custom --labels "Kidney=2,3")

if [ ! -f "$OUT/ct-clinical.nii.gz" ]; then
  $PY - "$DATA" "$OUT" <<'PY'
import sys
import SimpleITK as sitk
data, out = sys.argv[1:]
for name, interp, fill in (("ct", sitk.sitkLinear, -1024), ("ct_seg", sitk.sitkNearestNeighbor, 0)):
    image = sitk.ReadImage(f"{data}/{name}.nii.gz")
    grid = sitk.Image([512, 512, 200], image.GetPixelID())
    grid.SetSpacing((0.72, 0.72, 1.68))
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    sitk.WriteImage(sitk.Resample(image, grid, sitk.Transform(), interp, fill), f"{out}/{name}-clinical.nii.gz")
PY
fi
LIB="$OUT/library"
if [ ! -f "$LIB/cases.json" ]; then
  $MT cases add --library "$LIB" --id clinical-train-slab --split train --slices 0:154 \
    --image "$OUT/ct-clinical.nii.gz" --modality CT --label "$OUT/ct_seg-clinical.nii.gz"
  $MT cases add --library "$LIB" --id clinical-held-out-slab --split test --slices 154: \
    --image "$OUT/ct-clinical.nii.gz" --modality CT --label "$OUT/ct_seg-clinical.nii.gz"
fi
[ -d "$OUT/model-native" ] || $MT train --library "$LIB" --out "$OUT/model-native" --spacing native "${MODEL[@]}"
# The 1.5 mm model trains as many epochs as the native one did (the time ceiling may have stopped that one early).
TRAINED=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["training"]["epochs"])' \
          "$OUT/model-native/medtuning.json")
[ -d "$OUT/model-1.5" ] || $MT train --library "$LIB" --out "$OUT/model-1.5" --spacing 1.5 "${MODEL[@]}" \
  --epochs "$TRAINED" --minutes 100000
for spacing in native 1.5; do
  $MT evaluate --model "$OUT/model-$spacing" --library "$LIB" --split test --report "$OUT/report-$spacing" --force
done
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| working spacing | held-out Dice (kidney) | HD95 mm | s / held-out slab (512x512x46) | epochs trained |")
print("|---|---:|---:|---:|---:|")
for spacing in ("native", "1.5"):
    report = json.load(open(f"{out}/report-{spacing}/report.json"))
    case = report["cases"][0]
    manifest = json.load(open(f"{out}/model-{spacing}/medtuning.json"))
    epochs = manifest.get("training", {}).get("epochs", "?")
    print(f"| {spacing} | {case['metrics'].get('dice/Kidney')} | {case['metrics'].get('hd95/Kidney')} "
          f"| {case.get('seconds')} | {epochs} |")
PY
