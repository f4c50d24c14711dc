#!/usr/bin/env bash
# synthdrive on a CPU, 12 epochs: plain DINO vs random replay vs OOD replay vs oracle replay, then
# probes of every teacher (and of an untrained network), one comparison table and the detection table.
#   OUT=runs/synthdrive-cpu-12ep SEEDS="0 1" bash recipe.sh
# About 15 min per training run and 2-3 min per probe on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/synthdrive-cpu-12ep}
SEEDS=${SEEDS:-0 1}
COMMON="--preset cpu --epochs 12 --epoch-length 2100 --warmup_epochs 1 --lr 0.005 --saveckp_freq 3"
PROBE="--data synthetic --arch resnet18 --size 64 --crops-per-image 4 --seeds 0,1,2"
mkdir -p "$OUT"
for seed in $SEEDS; do
  for replay in none ood random oracle; do
    run="$OUT/$replay-s$seed"
    if [ "$replay" = none ]; then flag=--no-ood; else flag="--replay $replay"; fi
    oodfast train $COMMON --seed "$seed" $flag --output_dir "$run" --json "$run/train.json"
    oodfast evaluate represent $PROBE --encoder "$run/checkpoint.pth" \
        --json "$run/represent.json" --markdown "$run/represent.md"
  done
done
oodfast evaluate represent $PROBE --encoder random --json "$OUT/random-init-represent.json" \
    --markdown "$OUT/random-init-represent.md"
arms=""
for replay in none random ood oracle; do
  arms="$arms $replay=$(for s in $SEEDS; do printf '%s,' "$OUT/$replay-s$s/represent.json"; done)"
done
oodfast evaluate compare random-init="$OUT/random-init-represent.json" $arms \
    --json "$OUT/compare.json" --markdown "$OUT/compare.md"
# Detection (the paper's table): plain DINO's teacher as the detector encoder, and the OOD run's teacher.
first=${SEEDS%% *}
for replay in none ood; do
  oodfast evaluate detect --data synthetic --arch resnet18 --crop-size 64 --calib-sizes 256,1024 --seeds 0,1,2 \
      --encoder "$OUT/$replay-s$first/checkpoint.pth" --json "$OUT/detect-$replay.json" --markdown "$OUT/detect-$replay.md"
done
