#!/usr/bin/env bash
# Train / segment / evaluate on the real labelled volumes in ../shared/data with a CPU-sized model,
# and print the results table of the README. Usage: examples/real_data.sh OUT_DIR [MINUTES_PER_RUN]
#
# Protocols: BraTS 2015 (3 cases, FLAIR + T1c): train on two cases, test on the third, rotating;
# abdominal CT kidneys and spleen CT (one volume each): train on a slab of slices, test on the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: examples/real_data.sh OUT_DIR [MINUTES_PER_RUN]}
MINUTES=${2:-4}
DATA=../shared/data
MT=".venv/bin/medtuning"
# CPU-sized configuration (the demo's): a 4-block ViT-Tiny (width 192, 8-pixel patches) with the U-Net
# style decoder (width 16), Med-Tuning, random base weights (no pretrained weights on this machine).
MODEL=(--arch vit_unet --backbone vit_tiny_patch16_224 --backbone-args depth=4,patch_size=8 --decoder-width 16
       --method med_tuning --weights none --crop 16x128x128 --batch 2 --epochs 200 --steps-per-epoch 4
       --minutes "$MINUTES" --val-every 10 --device cpu --seed 0)
mkdir -p "$OUT"

# --- BraTS 2015: three folds -----------------------------------------------------------------------
CASES=(brats_2013_pat0003_1 brats_2013_pat0005_1 brats_2013_pat0006_1)
for test in 0 1 2; do
  LIB="$OUT/brats-fold$test/library"
  if [ ! -f "$LIB/cases.json" ]; then
    for i in 0 1 2; do
      c=${CASES[$i]}; split=train; [ "$i" = "$test" ] && split=test
      $MT cases add --library "$LIB" --id "$c" --split $split \
        --image "$DATA/brats2015/$c/Flair_subtrMeanDivStd.nii.gz" --modality FLAIR \
        --image "$DATA/brats2015/$c/T1c_subtrMeanDivStd.nii.gz" --modality T1c \
        --label "$DATA/brats2015/$c/OTMultiClass.nii.gz"
    done
  fi
  [ -d "$OUT/brats-fold$test/model" ] || \
    $MT train --library "$LIB" --out "$OUT/brats-fold$test/model" --task brats --source-labels brats2015 \
      "${MODEL[@]}"
  $MT evaluate --model "$OUT/brats-fold$test/model" --library "$LIB" --split test --report "$OUT/brats-fold$test/report" --force
done

# --- kidneys on the abdominal CT (TotalSegmentator labels 2, 3): slab 0:86 trains, 86:112 is held out ---
LIB="$OUT/kidney-ct/library"
if [ ! -f "$LIB/cases.json" ]; then
  $MT cases add --library "$LIB" --id abdomen-train-slab --split train --slices 0:86 \
    --image "$DATA/abdomen-ct-mr/ct.nii.gz" --modality CT --label "$DATA/abdomen-ct-mr/ct_seg.nii.gz"
  $MT cases add --library "$LIB" --id abdomen-held-out-slab --split test --slices 86: \
    --image "$DATA/abdomen-ct-mr/ct.nii.gz" --modality CT --label "$DATA/abdomen-ct-mr/ct_seg.nii.gz"
fi
[ -d "$OUT/kidney-ct/model" ] || \
  $MT train --library "$LIB" --out "$OUT/kidney-ct/model" --task custom --labels "Kidney=2,3" "${MODEL[@]}"
$MT evaluate --model "$OUT/kidney-ct/model" --library "$LIB" --split test --report "$OUT/kidney-ct/report" --force

# --- spleen CT (MSD Task09, hand-drawn): slab 0:16 trains, 16:26 is held out ----------------------------
LIB="$OUT/spleen-ct/library"
if [ ! -f "$LIB/cases.json" ]; then
  $MT cases add --library "$LIB" --id spleen-train-slab --split train --slices 0:16 \
    --image "$DATA/spleen-ct/ct.nii.gz" --modality CT --label "$DATA/spleen-ct/ct_seg.nii.gz"
  $MT cases add --library "$LIB" --id spleen-held-out-slab --split test --slices 16: \
    --image "$DATA/spleen-ct/ct.nii.gz" --modality CT --label "$DATA/spleen-ct/ct_seg.nii.gz"
fi
[ -d "$OUT/spleen-ct/model" ] || \
  $MT train --library "$LIB" --out "$OUT/spleen-ct/model" --task custom --labels "Spleen=1" "${MODEL[@]}"
$MT evaluate --model "$OUT/spleen-ct/model" --library "$LIB" --split test --report "$OUT/spleen-ct/report" --force

# --- one segmentation written for 3D Slicer --------------------------------------------------------------
$MT segment --model "$OUT/spleen-ct/model" --image "$DATA/spleen-ct/ct.nii.gz" --out "$OUT/spleen-ct/spleen.seg.nrrd" --force

# --- the table -----------------------------------------------------------------------------------------
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
def fmt(s, key, digits):
    e = s.get(key) or {}
    return "–" if e.get("mean") is None else f"{e['mean']:.{digits}f}"
print("| data | protocol | region | Dice | HD95 (mm) | training |")
print("|---|---|---|---|---|---|")
for report in sorted(out.glob("*/report/report.json")):
    r = json.loads(report.read_text(encoding="utf-8"))
    m = json.loads((report.parent.parent / "model" / "medtuning.json").read_text(encoding="utf-8"))["training"]
    train = f"{m['epochs']} epochs, {m['seconds'] / 60:.1f} min"
    for region in r["regions"]:
        print(f"| {report.parent.parent.name} | test: {', '.join(c['id'] for c in r['cases'])} | {region} | "
              f"{fmt(r['summary'], 'dice/' + region, 3)} | {fmt(r['summary'], 'hd95/' + region, 1)} | {train} |")
PY
