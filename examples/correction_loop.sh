#!/usr/bin/env bash
# The correction loop measured on real data, with a simulated radiologist.
# Usage: examples/correction_loop.sh OUT_DIR [ROUNDS] [RETUNE_EPOCHS]
#
# Data: the abdominal CT of ../shared/data/abdomen-ct-mr (122x101x112, 3 mm; TotalSegmentator labels),
# liver (5) and kidneys (2, 3), cut into slabs of 6 axial slices over slices 64..112 where they lie:
#   - a seed slab (88:94) trains round 0;
#   - a fixed held-out test slab (82:88) scores every round (never trained on, never used to pick an epoch);
#   - the 6 other slabs are unlabelled scans.
# Each round: pick the next scan (`medtuning suggest`, or a seeded random choice), segment it with the
# current model, "correct" it (the reference label stands in for the radiologist's correction, as in
# interactive-segmentation papers), add it with its correction effort, re-tune from the current model.
# The same round 0 model starts both strategies. Prints (and writes OUT_DIR/table.md) held-out Dice per
# round and the correction effort of the scan added in each round.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: examples/correction_loop.sh OUT_DIR [ROUNDS] [RETUNE_EPOCHS]}
ROUNDS=${2:-3}
RETUNE_EPOCHS=${3:-8}
R0_EPOCHS=${R0_EPOCHS:-24}   # round 0 (training on the seed slab)
DATA=../shared/data/abdomen-ct-mr
MT=".venv/bin/medtuning"
[ -f "$DATA/ct.nii.gz" ] || { echo "needs $DATA (see ../shared/data/README.md)"; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MEDTUNING_HOME="$OUT/home"   # its own decode cache
# The demo's CPU-sized model: a 4-block ViT-Tiny (8-pixel patches) + U-Net style decoder, Med-Tuning,
# random base weights (no pretrained weights on this machine).
MODEL=(--arch vit_unet --backbone vit_tiny_patch16_224 --backbone-args depth=4,patch_size=8 --decoder-width 16
       --method med_tuning --weights none --crop 6x64x64 --batch 2 --device cpu --seed 0)
LABELS="Liver=5;Kidney=2,3"
SEED=88:94
TEST=82:88
POOL=(64:70 70:76 76:82 94:100 100:106 106:112)
t0=$(date +%s)

# --- round 0: seed slab + held-out test slab ----------------------------------------------------------
BASE="$OUT/base-library"
if [ ! -f "$BASE/cases.json" ]; then
  $MT cases add --library "$BASE" --id "seed-$SEED" --split train --slices $SEED \
    --image "$DATA/ct.nii.gz" --modality CT --label "$DATA/ct_seg.nii.gz"
  $MT cases add --library "$BASE" --id "test-$TEST" --split test --slices $TEST \
    --image "$DATA/ct.nii.gz" --modality CT --label "$DATA/ct_seg.nii.gz"
  for s in "${POOL[@]}"; do
    $MT cases add --library "$BASE" --id "scan-$s" --split unlabelled --slices "$s" \
      --image "$DATA/ct.nii.gz" --modality CT
  done
fi
[ -d "$OUT/round0" ] || $MT train --library "$BASE" --out "$OUT/round0" --task custom --labels "$LABELS" \
  "${MODEL[@]}" --epochs "$R0_EPOCHS" --steps-per-epoch 4 --val-every 5

# --- rounds 1..ROUNDS, for each strategy ------------------------------------------------------------
for strategy in suggest random; do
  LIB="$OUT/$strategy/library"
  if [ ! -f "$LIB/cases.json" ]; then mkdir -p "$OUT/$strategy"; cp -r "$BASE" "$LIB"; fi
  model="$OUT/round0"
  for round in $(seq 1 "$ROUNDS"); do
    next_model="$OUT/$strategy/round$round"
    if [ ! -d "$next_model" ]; then
      if [ "$strategy" = suggest ]; then
        pick=$($MT suggest --model "$model" --library "$LIB" --top 1 --device cpu --events jsonl \
               | .venv/bin/python -c "import json,sys; print([json.loads(l) for l in sys.stdin][-1]['outputs']['next'])")
      else
        pick=$(.venv/bin/python - "$LIB" <<'EOF'
import json, random, sys
cases = json.load(open(sys.argv[1] + "/cases.json"))["cases"]
left = sorted(c["id"] for c in cases if c["split"] == "unlabelled")
print(random.Random(len(left)).choice(left))   # seeded: the same picks on every run
EOF
)
      fi
      slices=${pick#scan-}
      echo "== $strategy round $round: correcting $pick (slices $slices)"
      image="$LIB/$(.venv/bin/python -c "import json,sys; c=[c for c in json.load(open('$LIB/cases.json'))['cases'] if c['id']=='$pick'][0]; print(c['images']['CT'])")"
      $MT segment --model "$model" --image "$image" --out "$OUT/$strategy/$pick-model.seg.nrrd" --device cpu --force
      # The simulated radiologist: the reference label of these slices is the corrected segmentation.
      $MT cases add --library "$LIB" --id "corrected-$slices" --split train --slices "$slices" \
        --image "$DATA/ct.nii.gz" --modality CT --label "$DATA/ct_seg.nii.gz" \
        --provenance correction --from-model "$model" --model-output "$OUT/$strategy/$pick-model.seg.nrrd"
      $MT cases remove --library "$LIB" --id "$pick"
      $MT retune --model "$model" --library "$LIB" --out "$next_model" --epochs "$RETUNE_EPOCHS" \
        --steps-per-epoch 4 --device cpu
    fi
    model="$next_model"
  done
  $MT history --model "$model" --events jsonl > "$OUT/$strategy/history.jsonl"
done
t1=$(date +%s)

# --- the table ----------------------------------------------------------------------------------------
.venv/bin/python - "$OUT" "$ROUNDS" "$RETUNE_EPOCHS" "$((t1 - t0))" "$R0_EPOCHS" <<'EOF'
import json, os, platform, sys
out, rounds, epochs, seconds, r0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only; model: ViT-Tiny 4 blocks "
         f"(8-px patches) + U-Net decoder, Med-Tuning, random base weights, crop 6x64x64, batch 2; round 0: {r0} epochs "
         f"x 4 steps on the seed slab; each re-tune: {epochs} epochs x 4 steps; {rounds} rounds; whole run "
         f"{seconds / 60:.1f} min.", "",
         "| strategy | round | scan corrected | train slabs | held-out Dice Liver | held-out Dice Kidney | "
         "correction: Dice model vs corrected (Liver / Kidney) | correction: cm³ changed (Liver / Kidney) |",
         "|---|---|---|---|---|---|---|---|"]
for strategy in ("suggest", "random"):
    events = [json.loads(l) for l in open(os.path.join(out, strategy, "history.jsonl"))]
    for r in events[-1]["outputs"]["rounds"]:
        eff = r["effort"]
        def d(name):
            e = eff.get(name)
            return "–" if not e or e.get("dice") is None else f"{e['dice']:.3f}"
        def cm3(name):
            e = eff.get(name)
            return "–" if not e else f"{(e['mm3_added'] + e['mm3_removed']) / 1000:.1f}"
        scan = ", ".join(n.replace("corrected-", "slices ") for n in r["new_cases"]) or "seed slab 88:94"
        lines.append(f"| {strategy} | {r['round']} | {scan} | {r['train_cases']} | {r['dice'].get('Liver', 0):.3f} | "
                     f"{r['dice'].get('Kidney', 0):.3f} | {d('Liver')} / {d('Kidney')} | {cm3('Liver')} / {cm3('Kidney')} |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "table.md"), "w").write(text)
print(text)
EOF
