#!/usr/bin/env bash
# The GPU checks and reports of the bench issue, in one command, on a machine with CUDA:
#
#     bash benchmarks/gpu.sh [OUT_DIR]        (default: benchmarks/results)
#
# With oodfast installed (`pip install -e ".[dev,plot]"`, plus nvidia-dali-cuda130 for the aug stage),
# it writes OUT_DIR/<gpu>-<date>{-tests.txt,-train.{json,md},.json,.md,.png,-pytest-benchmark.json}:
#   1. the kernel tests compiled for the GPU (tests/kernels: Triton, registered ops, compiled op) and
#      the bench tests (CUDA-graph replay);
#   2. a short `oodfast train` on CUDA (paper preset, 20 steps): torch.compile, bf16, DALI or torchvision
#      (its checkpoints go to runs/, which git ignores; its report to OUT_DIR);
#   3. `oodfast bench --device cuda` at full size, every stage (aug only with DALI), with its verdict
#      on each target;
#   4. the pytest-benchmark suites at full size.
# Each step runs even if an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: tests/ and benchmarks/ are relative to it

out=${1:-benchmarks/results}
python - <<'EOF' || exit 2
import torch
if not torch.cuda.is_available():
    raise SystemExit("benchmarks/gpu.sh: torch sees no GPU (torch.cuda.is_available() is False); "
                     "run it on a CUDA machine, or use `oodfast bench --device cpu --quick` here")
EOF
gpu=$(python -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stem="$out/$gpu-$(date -u +%F)"
mkdir -p "$out"
failed=()

if python -c "import nvidia.dali" 2>/dev/null; then
    stages=aug,detect,ring,step aug=dali
else
    echo "benchmarks/gpu.sh: DALI is not installed (pip install nvidia-dali-cuda130): skipping the aug stage," \
         "training with --aug torch" >&2
    stages=detect,ring,step aug=torch
fi
plot=()
python -c "import matplotlib" 2>/dev/null && plot=(--plot "$stem.png")

echo "== 1/4 kernel and bench tests on $gpu"
python -m pytest -q tests/kernels tests/test_bench.py 2>&1 | tee "$stem-tests.txt" || failed+=(tests)

echo "== 2/4 oodfast train on CUDA (paper preset, 20 steps)"
python -m oodfast.cli train --device cuda --preset paper --aug "$aug" --epochs 1 --epoch-length 1280 \
    --synthetic-images 512 --output_dir "runs/$gpu-bench-train" --json "$stem-train.json" --markdown "$stem-train.md" \
    || failed+=(train)

echo "== 3/4 oodfast bench --device cuda (full size: $stages)"
python -m oodfast.cli bench --device cuda --stages "$stages" --json "$stem.json" --markdown "$stem.md" "${plot[@]}" \
    || failed+=(bench)

echo "== 4/4 pytest-benchmark suites"
OODFAST_BENCH_DEVICE=cuda python -m pytest benchmarks/ --benchmark-only -q \
    --benchmark-json "$stem-pytest-benchmark.json" || failed+=(pytest-benchmark)

if ((${#failed[@]})); then
    echo "benchmarks/gpu.sh: failed: ${failed[*]} (outputs under $out)" >&2
    exit 1
fi
echo "benchmarks/gpu.sh: all passed; reports under $stem*"
