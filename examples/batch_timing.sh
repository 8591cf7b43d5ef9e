#!/usr/bin/env bash
# Time per scan: one 'medtuning segment' process per scan against one 'segment --batch-list' job
# (the model loaded once). The scans are copies of slicerio's CTChest4 (128 x 128 x 34); the model
# is a CPU-sized one (ViT-Tiny, 4 blocks, 8-pixel patches, U-Net decoder) tuned briefly on it.
# Usage: examples/batch_timing.sh OUT_DIR [SCANS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: examples/batch_timing.sh OUT_DIR [SCANS]}
N=${2:-6}
MT=".venv/bin/medtuning"
CT=$(.venv/bin/python -c "import slicerio, os; print(os.path.join(os.path.dirname(slicerio.__file__), 'data'))")
mkdir -p "$OUT/scans"
if [ ! -d "$OUT/model" ]; then
  $MT cases add --library "$OUT/library" --image "$CT/CTChest4.nrrd" --modality CT \
    --label "$CT/Segmentation.seg.nrrd" --id chest-upper --slices 0:24 --split train
  $MT cases add --library "$OUT/library" --image "$CT/CTChest4.nrrd" --modality CT \
    --label "$CT/Segmentation.seg.nrrd" --id chest-lower --slices 24:34 --split val
  $MT train --library "$OUT/library" --out "$OUT/model" --segments "right lung,left lung" \
    --arch vit_unet --backbone vit_tiny_patch16_224 --backbone-args depth=4,patch_size=8 --decoder-width 16 \
    --weights none --crop 16x128x128 --batch 2 --epochs 1 --steps-per-epoch 2 --device cpu --seed 0
fi
echo "id,CT,out" > "$OUT/batch.csv"
for i in $(seq 1 "$N"); do
  cp "$CT/CTChest4.nrrd" "$OUT/scans/scan$i.nrrd"
  echo "scan$i,scans/scan$i.nrrd,batch/scan$i.seg.nrrd" >> "$OUT/batch.csv"
done
rm -rf "$OUT/single" "$OUT/batch"
start=$(date +%s.%N)
for i in $(seq 1 "$N"); do
  $MT segment --model "$OUT/model" --image "$OUT/scans/scan$i.nrrd" --out "$OUT/single/scan$i.seg.nrrd" \
    --device cpu > /dev/null 2>&1
done
single=$(echo "($(date +%s.%N) - $start) / $N" | bc -l)
start=$(date +%s.%N)
$MT segment --model "$OUT/model" --batch-list "$OUT/batch.csv" --device cpu > /dev/null 2>&1
batch=$(echo "($(date +%s.%N) - $start) / $N" | bc -l)
printf "scans: %d\none segment process per scan: %.2f s per scan\none --batch-list job:          %.2f s per scan\n" \
  "$N" "$single" "$batch"
