#!/usr/bin/env bash
# Paper-size benchmarks on one CUDA GPU: ViT-B/16 + UPerNet and Swin-UNet, 128^3 crops, batch 2.
#
#   bash bench/gpu.sh OUT_DIR [PYTHON]
#
# Writes into OUT_DIR: train-<arch>.json / .md (bench train: tables (a) same settings, (b) own defaults),
# infer-<arch>.json / .md (bench infer: plain fp32 vs the tuned path, seconds per volume), machine.txt
# (nvidia-smi, torch), settings-<arch>.json / .md (bench infer --variant: precision, windows per call, TTA),
# peers.json / .md (bench peers) and README.md (everything in one file). Base weights are random (timing only).
# BRATS_CASE (default ../shared/data/brats2015/brats_2013_pat0003_1) gives the real volume for bench infer
# (Flair + T1c, with its label); without it a synthetic 155x240x240 volume is used.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu.sh OUT_DIR [PYTHON]" >&2
    exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${2:-${PYTHON:-$HERE/.venv/bin/python}}
[ -x "$PY" ] || PY=$(command -v python3)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$HERE"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: PyTorch sees no CUDA GPU; run this on a GPU machine" >&2
    exit 3
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/machine.txt"

CROP=128x128x128
BATCH=2
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
METHODS=${METHODS:-full,head,med_tuning,adapter,st_adapter}
BRATS_CASE=${BRATS_CASE:-$HERE/../shared/data/brats2015/brats_2013_pat0003_1}

for ARCH in vit_upernet swin_unet; do
    echo "== bench train $ARCH ($CROP, batch $BATCH)" >&2
    "$PY" -m MedTuningLib bench train --arch "$ARCH" --crop "$CROP" --batch "$BATCH" --methods "$METHODS" \
        --steps "$STEPS" --warmup "$WARMUP" --device cuda --json "$OUT/train-$ARCH.json" \
        > "$OUT/train-$ARCH.md"

    echo "== bench infer $ARCH" >&2
    if [ -f "$BRATS_CASE/Flair_subtrMeanDivStd.nii.gz" ]; then
        # Two modalities (Flair, T1c) -> a 2-channel model built from --arch (random base: timing and agreement).
        "$PY" -m MedTuningLib bench infer --arch "$ARCH" --crop "$CROP" --repeats 3 --device cuda \
            --image "$BRATS_CASE/Flair_subtrMeanDivStd.nii.gz" --image "$BRATS_CASE/T1c_subtrMeanDivStd.nii.gz" \
            --json "$OUT/infer-$ARCH.json" > "$OUT/infer-$ARCH.md"
    else
        "$PY" -m MedTuningLib bench infer --arch "$ARCH" --crop "$CROP" --size 155x240x240 --repeats 3 \
            --device cuda --json "$OUT/infer-$ARCH.json" > "$OUT/infer-$ARCH.md"
    fi

    # The inference settings on a GPU (README "Choosing the inference settings" has the CPU's): precision,
    # windows per call, and the two ways of running test-time flips. Dice against the first variant.
    echo "== bench infer $ARCH: settings" >&2
    "$PY" -m MedTuningLib bench infer --arch "$ARCH" --crop "$CROP" --size 155x240x240 --repeats 3 --device cuda \
        --variant precision=fp32 --variant precision=bf16 --variant precision=fp16 --variant sw_batch=1 \
        --variant sw_batch=8 --variant tta=on --variant tta=volume \
        --json "$OUT/settings-$ARCH.json" > "$OUT/settings-$ARCH.md"
done

# MedTuning against nnU-Net's 3d_fullres network and MONAI's SwinUNETR / SegResNet, each on its own grid, on a
# clinical CT grid (PEERS_IMAGE, default a synthetic 200x512x512 volume at 0.72x0.72x1.68 mm: with random
# weights the cost does not depend on the content). The nnunet row needs dynamic_network_architectures.
echo "== bench peers" >&2
PEERS_ARGS=(--device cuda --json "$OUT/peers.json")
[ -n "${PEERS_IMAGE:-}" ] && PEERS_ARGS+=(--image "$PEERS_IMAGE")
"$PY" -m MedTuningLib bench peers "${PEERS_ARGS[@]}" > "$OUT/peers.md"

{
    echo "# MedTuning benchmarks on a GPU"
    echo
    echo '```'
    cat "$OUT/machine.txt"
    echo '```'
    for ARCH in vit_upernet swin_unet; do
        echo
        echo "## $ARCH: training (crop $CROP, batch $BATCH, $STEPS timed steps after $WARMUP warm-up)"
        cat "$OUT/train-$ARCH.md"
        echo
        echo "## $ARCH: inference"
        cat "$OUT/infer-$ARCH.md"
        echo
        echo "## $ARCH: inference settings (bench infer --variant)"
        cat "$OUT/settings-$ARCH.md"
    done
    echo
    echo "## MedTuning and its peers: one clinical-size CT, each on its own grid (bench peers)"
    cat "$OUT/peers.md"
} > "$OUT/README.md"
echo "bench/gpu.sh: tables in $OUT/README.md" >&2
