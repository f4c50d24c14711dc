#!/usr/bin/env bash
# synthdrive CPU recipe: plain DINO vs random replay vs OOD replay vs oracle replay, then probes.
set -euo pipefail
OUT=${OUT:-runs/synthdrive-cpu}
mkdir -p "$OUT"
COMMON="--preset cpu --epochs 4 --epoch-length 960 --lr 0.005 --seed 0"
for replay in none random ood oracle; do
  if [ "$replay" = none ]; then flag=--no-ood; else flag="--replay $replay"; fi
  oodfast train $COMMON $flag --output_dir "$OUT/$replay" --json "$OUT/$replay/train.json"
  oodfast evaluate represent --data synthetic --encoder "$OUT/$replay/checkpoint.pth" --arch resnet18 \
      --size 64 --crops-per-image 4 --seeds 0,1,2 --json "$OUT/$replay/represent.json" --markdown "$OUT/$replay/represent.md"
done
oodfast evaluate represent --data synthetic --encoder random --arch resnet18 --size 64 --crops-per-image 4 \
    --seeds 0,1,2 --json "$OUT/random-init-represent.json" --markdown "$OUT/random-init-represent.md"
oodfast evaluate detect --data synthetic --encoder "$OUT/ood/checkpoint.pth" --arch resnet18 --crop-size 64 \
    --calib-sizes 256,1024 --seeds 0,1,2 --json "$OUT/detect.json" --markdown "$OUT/detect.md"
