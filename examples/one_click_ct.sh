#!/usr/bin/env bash
# One click on a clinical-size CT, timed as the user waits for it: the whole `medtuning segment` command
# (process start and imports, model load, reading the scan, the 1.5 mm working grid and back, writing the
# .seg.nrrd), for a ViT-B/16 + UPerNet and a Swin-UNet Med-Tuning model with a 1.5 mm working spacing.
# Random base weights, each model trained for one step: the cost does not depend on the weights (no pretrained
# weights exist on the development machine), so this measures time only, not segmentation quality.
#
# Usage: examples/one_click_ct.sh OUT_DIR CT_FILE [MODES]
#   CT_FILE: e.g. the 512x512x200 clinical grid examples/spacing_cost.sh writes (OUT/ct-clinical.nii.gz)
#   MODES:   "fast" (segment --fast, the default here) and/or "default" (segment's defaults; about 4x slower)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: examples/one_click_ct.sh OUT_DIR CT_FILE [MODES]}
CT=${2:?usage: examples/one_click_ct.sh OUT_DIR CT_FILE [MODES]}
MODES=${3:-fast}
DATA=../shared/data/abdomen-ct-mr
MT=".venv/bin/medtuning"
PY=".venv/bin/python"
mkdir -p "$OUT"
LIB="$OUT/library"
# A 16-slice slab of the shared 3 mm abdominal CT with liver and kidneys: enough for the one training step.
[ -f "$LIB/cases.json" ] || $MT cases add --library "$LIB" --id slab --split train --slices 64:80 \
  --image "$DATA/ct.nii.gz" --modality CT --label "$DATA/ct_seg.nii.gz"
for ARCH in vit_upernet swin_unet; do
  [ -d "$OUT/model-$ARCH" ] || $MT train --library "$LIB" --out "$OUT/model-$ARCH" --arch "$ARCH" \
    --method med_tuning --weights none --task custom --labels "Liver=5;Kidney=2,3" --spacing 1.5 \
    --crop 16x128x128 --batch 1 --epochs 1 --steps-per-epoch 1 --device cpu --seed 0
done
$PY - "$OUT" "$CT" $MODES <<'PY'
import json, os, resource, subprocess, sys, time
out, ct, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for arch in ("vit_upernet", "swin_unet"):
    for mode in modes:
        log = f"{out}/{arch}-{mode}.jsonl"
        argv = [".venv/bin/medtuning", "segment", "--model", f"{out}/model-{arch}", "--image", ct,
                "--out", f"{out}/{arch}-{mode}.seg.nrrd", "--device", "cpu", "--force", "--events", "jsonl"]
        argv += ["--fast"] if mode == "fast" else []
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            subprocess.run(argv, stdout=fh, check=True)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far (KiB)
        events = [json.loads(line) for line in open(log)]
        first = {}
        for e in events:
            if e["event"] == "progress":
                first.setdefault(e["phase"], e["t"])
        done = events[-1]["t"]
        startup = wall - done  # the interpreter and the command line, before the backend's clock starts
        rows.append((arch, mode, wall, startup + first["infer"], first["write"] - first["infer"],
                     done - first["write"], peak / 1024 if peak > before else None))
print(f"CT {ct}; machine load {os.getloadavg()[0]:.1f} at the end")
print("| model | settings | whole command (s) | start, imports, model load (s) | read, working grid, network, "
      "back (s) | write .seg.nrrd (s) | peak RSS (MB) |")
print("|---|---|---:|---:|---:|---:|---:|")
for arch, mode, wall, start, infer, write, peak in rows:
    peak_text = f"{peak:.0f}" if peak else "-"
    print(f"| {arch} | {'--fast' if mode == 'fast' else 'defaults'} | {wall:.1f} | {start:.1f} | {infer:.1f} "
          f"| {write:.1f} | {peak_text} |")
PY
