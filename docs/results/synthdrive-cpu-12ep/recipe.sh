#!/usr/bin/env bash
# synthdrive on a CPU, 12 epochs: plain DINO vs random replay vs OOD replay vs oracle replay (seed 0),
# a second plain-DINO seed to measure pretraining-seed noise, probes of every teacher and of an
# untrained network under two protocols, the comparison tables and the detection tables.
#   OUT=runs/synthdrive-cpu-12ep bash recipe.sh
# On 2 CPU cores, one job at a time: about 12-16 min per training run, 1 min per main-protocol probe,
# 5-6 min per tau=0.03 probe (16 crops per image), 2.5 min per detection table; about 2 h in all.
# Run one job at a time: two torch processes on 2 cores slow each other down several-fold.
set -euo pipefail
OUT=${OUT:-runs/synthdrive-cpu-12ep}
COMMON="--preset cpu --epochs 12 --epoch-length 2100 --warmup_epochs 1 --lr 0.005 --saveckp_freq 3"
PROBE="--data synthetic --arch resnet18 --size 64 --seeds 0,1,2"
MAIN="--crops-per-image 4"                 # rare presence: rare-class share >= 0.001 (the default tau)
VISIBLE="--crops-per-image 16 --tau 0.03"  # rare presence: rare objects cover >= 3% of the crop
mkdir -p "$OUT"

probe() {  # probe ENCODER NAME
  oodfast evaluate represent $PROBE $MAIN --encoder "$1" --json "$OUT/$2-represent.json" --markdown "$OUT/$2-represent.md"
  oodfast evaluate represent $PROBE $VISIBLE --encoder "$1" --json "$OUT/$2-represent-t03.json" \
      --markdown "$OUT/$2-represent-t03.md"
}

for arm in none:0 ood:0 random:0 oracle:0 none:1; do
  replay=${arm%:*} seed=${arm#*:}
  run="$OUT/$replay-s$seed"
  if [ "$replay" = none ]; then flag=--no-ood; else flag="--replay $replay"; fi
  oodfast train $COMMON --seed "$seed" $flag --output_dir "$run" --json "$run/train.json"
  probe "$run/checkpoint.pth" "$replay-s$seed"
done
probe random random-init

for suffix in represent represent-t03; do
  oodfast evaluate compare random-init="$OUT/random-init-$suffix.json" \
      none-s0="$OUT/none-s0-$suffix.json" none-s1="$OUT/none-s1-$suffix.json" random-s0="$OUT/random-s0-$suffix.json" \
      ood-s0="$OUT/ood-s0-$suffix.json" oracle-s0="$OUT/oracle-s0-$suffix.json" \
      --json "$OUT/compare-$suffix.json" --markdown "$OUT/compare-$suffix.md"
done
# Detection (the paper's table): plain DINO's teacher as the detector encoder, and the OOD run's teacher.
for replay in none ood; do
  oodfast evaluate detect --data synthetic --arch resnet18 --crop-size 64 --calib-sizes 256,1024 --seeds 0,1,2 \
      --encoder "$OUT/$replay-s0/checkpoint.pth" --json "$OUT/detect-$replay.json" --markdown "$OUT/detect-$replay.md"
done
