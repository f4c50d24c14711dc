#!/usr/bin/env bash
# The GPU checks and reports, in one command of at most 8 minutes on a cold H200:
#
#     bash benchmarks/gpu.sh [OUT_DIR]
#
# Reports go to $OUT (the device tool's output folder) when it is set, else OUT_DIR, else
# benchmarks/results; each is written as it is measured, so a command stopped early still returns
# every figure taken before. Sections, each under its own time cap (CAP below; they sum to <= 8 minutes):
#   dali    DALI in /tmp/site, or assembled there from the parts of ../shared/tools/device-wheels.sh
#   setup   oodfast from the carried wheel .whl/oodfast-*.whl (benchmarks/build-gpu-wheel.sh) or else the source
#           tree laid out as pyproject maps it (benchmarks/gpu_install.py), into a folder on PYTHONPATH:
#           the machine's torch, torchvision and triton are never touched. -> STEM-env.json
#   tests   tests/kernels (Triton compiled for this GPU; test_compile.py: the real compiler + ptxas),
#           tests/train/test_cuda.py (20 trainer steps under sync debug mode), tests/test_bench.py
#           (CUDA-graph replay)                                                -> STEM-tests.txt
#   detect  oodfast bench stages detect + ring: the paper's scipy loop vs torch vs fused Triton, eager and
#           replayed from a CUDA graph, share of the copy bandwidth; the ring   -> STEM.{json,md,png}
#   aug     DALI GPU multi-crop at each hw_decoder_load vs decode-only vs the paper's PIL path vs
#           torchvision (skipped, and said so, without DALI)                   -> STEM.{json,md,png}
#   step    ResNet-50 DINO step eager vs compiled, random replay, frozen detector (OOD overhead),
#           end to end vs step-only                                           -> STEM.{json,md,png}
# STEM is OUT/<gpu>-<date>; STEM-gpu.log holds all output, STEM-sections.tsv each section's time and status.
# GPU_SECTIONS="detect step" runs setup and those only (a rerun on a warm machine merges into the report
# of the previous call, which gpu.sh keeps in /tmp/oodfast-gpu). GPU_SECTIONS=suites adds the
# pytest-benchmark suites (not in the 8 minutes; all of benchmarks/, so the dense cases of bench_detect.py,
# test_dense_enqueue, too; GPU_SUITES="-k dense" narrows them) -> STEM-pytest-benchmark.json.
# Exit status: 0 when every section ran and passed; 1 if one failed or hit its cap; 2 without a GPU;
# 3 when all that ran passed but the aug stage was skipped.
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."  # the repository root: tests/ and benchmarks/ are relative to it

DEFAULT_SECTIONS="dali setup tests detect aug step"
# Time caps in seconds. A section past its cap gets SIGINT (pytest and the bench write what they have),
# then SIGKILL GRACE seconds later. sum(CAP[s] + GRACE) over DEFAULT_SECTIONS must stay <= TOTAL (a test checks).
declare -A CAP=([dali]=40 [setup]=25 [tests]=125 [detect]=70 [aug]=75 [step]=120 [suites]=300)
GRACE=4
TOTAL=480
WORK=/tmp/oodfast-gpu  # installs, caches and data: never under $OUT, which comes back to the caller

section_dali() {
    # DALI: installed by the last parts call of device-wheels.sh, or assembled here from its parts
    # (/tmp/wparts from earlier calls on this warm machine, plus any .device-wheels/pN this call carries).
    # Its own section: a failure here only skips the aug stage.
    if PYTHONPATH=/tmp/site python3 -P -c "import nvidia.dali" 2>/dev/null; then
        echo "dali: importable from /tmp/site"
        return 0
    fi
    for p in .device-wheels/p*/part; do
        [ -f "$p" ] || continue
        mkdir -p /tmp/wparts && n=$(basename "$(dirname "$p")") && cp "$p" "/tmp/wparts/${n#p}"
    done
    if ! compgen -G "/tmp/wparts/*" >/dev/null; then
        echo "dali: not in /tmp/site and no parts in /tmp/wparts (make the parts calls of ../shared/tools/device-wheels.sh)"
        return 1
    fi
    echo "dali: assembling from /tmp/wparts: $(ls -v /tmp/wparts | tr '\n' ' ')"
    rm -rf /tmp/w && mkdir -p /tmp/w
    # shellcheck disable=SC2046
    cat $(ls -v /tmp/wparts/*) | tar -x -C /tmp/w \
        || { echo "dali: the parts in /tmp/wparts are incomplete (make every parts call back to back)"; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target /tmp/site \
        /tmp/w/*.whl || return 1
    PYTHONPATH=/tmp/site python3 -P -c "import nvidia.dali as d; print('dali:', d.__version__, 'in /tmp/site')"
}

section_setup() {
    mkdir -p "$WORK"
    local site_dali=/tmp/site dali=no
    if PYTHONPATH=$site_dali python3 -P -c "import nvidia.dali" 2>/dev/null; then
        dali=yes
    else
        echo "setup: no DALI in $site_dali: the aug stage will be skipped, the step stage loads with torchvision"
    fi
    # oodfast: the carried wheel when it matches this tree, else the tree laid out as the wheel would be
    local info
    info=$(python3 -P benchmarks/gpu_install.py install "$WORK/site") || { echo "setup: installing oodfast failed"; return 1; }
    echo "setup: $info"
    local path="$WORK/site"
    [ "$dali" = yes ] && path="$path:$site_dali"
    python3 -P - "$info" "$path" "$dali" >"$WORK/env.sh" <<'EOF' || return 1
import json, shlex, sys
info, path, dali = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
install = info["method"] + (f" {info['wheel']}" if info.get("wheel") else "") + \
    (f"; {info['wheel_skipped']}" if info.get("wheel_skipped") else "")
for k, v in {"PYTHONPATH": path, "OODFAST_GIT_SHA": info.get("git_sha") or "unknown (no .git, no .whl/SOURCE.json)",
             "OODFAST_INSTALL": install, "OODFAST_GPU_TREE_SHA256": info["tree_sha256"], "OODFAST_GPU_DALI": dali,
             "OODFAST_CACHE": "/tmp/oodfast-gpu/cache",
             # no Python started from here (pytest-xdist workers, subprocess tests) puts the working
             # directory first on sys.path: ./oodfast (without its kernels/ and cli/) would shadow the install
             "PYTHONSAFEPATH": "1"}.items():
    print(f"export {k}={shlex.quote(v)}")
EOF
    # shellcheck disable=SC1091
    source "$WORK/env.sh"
    python3 -P -m oodfast.bench.gpu env "$STEM"  # -> STEM-env.json: device, driver, torch, triton, CUDA, DALI, SHA
}

section_tests() {
    local want=(tests/kernels tests/train/test_cuda.py tests/test_bench.py) have=() missing=()
    for t in "${want[@]}"; do if [ -e "$t" ]; then have+=("$t"); else missing+=("$t"); fi; done
    [ -e tests/kernels/test_compile.py ] || missing+=(tests/kernels/test_compile.py)
    local xdist=()
    python3 -P -c "import xdist" 2>/dev/null && xdist=(-n 4 --dist loadfile)
    {
        python3 -P -c "import json, sys; e = json.load(open(sys.argv[1])); print('#', ', '.join(
            f'{k} {e.get(k)}' for k in ('device', 'driver', 'cuda', 'torch', 'triton', 'dali', 'git_sha', 'date')))" \
            "$STEM-env.json" 2>/dev/null
        echo "# python3 -m pytest ${have[*]}${missing:+  (missing, not run: ${missing[*]})}"
    } >"$STEM-tests.txt"
    # SIGINT at the cap: pytest stops and prints its summary (the handler is reset in case the caller ignored it)
    python3 -P -c 'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' -v -rfEs --durations=15 -p no:cacheprovider "${xdist[@]}" "${have[@]}" \
        2>&1 | tee -a "$STEM-tests.txt"
    local rc=${PIPESTATUS[0]}
    case $rc in
        0) ;;
        5) echo "tests: pytest collected no tests (exit 5): a failure, not a pass" | tee -a "$STEM-tests.txt" ;;
        *) echo "tests: pytest exit $rc" | tee -a "$STEM-tests.txt" ;;
    esac
    if ((${#missing[@]})); then
        echo "tests: missing test files (not run): ${missing[*]}" | tee -a "$STEM-tests.txt"
        ((rc)) || rc=4
    fi
    return "$rc"
}

section_detect() { python3 -P -m oodfast.bench.gpu bench "$STEM" detect,ring; }
section_aug() { python3 -P -m oodfast.bench.gpu bench "$STEM" aug; }
section_step() { python3 -P -m oodfast.bench.gpu bench "$STEM" step; }
section_suites() {
    local extra=()
    read -ra extra <<<"${GPU_SUITES:-}"  # e.g. GPU_SUITES="-k dense": pytest arguments that select cases
    OODFAST_BENCH_DEVICE=cuda python3 -P -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$STEM-pytest-benchmark.json" "${extra[@]}"
}

# ---- the plan: each default section and its cap (tests/test_gpu_script.py reads it; needs no GPU) ---
if [ "${1:-}" = --plan ]; then
    for s in $DEFAULT_SECTIONS; do echo "section $s ${CAP[$s]}"; done
    echo "grace $GRACE"
    echo "total $TOTAL"
    exit 0
fi

# ---- a section run by the driver below, in its own process under timeout --------------------------
if [ "${1:-}" = --section ]; then
    # shellcheck disable=SC1091
    [ "$2" = setup ] || [ "$2" = dali ] || source "$WORK/env.sh"
    "section_$2"
    exit
fi

# ---- the driver -----------------------------------------------------------------------------------
out=${OUT:-${1:-benchmarks/results}}
mkdir -p "$out" "$WORK/last"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr 'A-Z' 'a-z' \
      | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
if [ -z "$gpu" ] || ! timeout 60 python3 -P -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh: no GPU (nvidia-smi or torch.cuda.is_available() say none); run it on a CUDA" \
         "machine, or use \`oodfast bench --device cpu --quick\` here" >&2
    exit 2
fi
export STEM="$out/$gpu-$(date -u +%F)" WORK PYTHONUNBUFFERED=1
exec > >(tee -a "$STEM-gpu.log") 2>&1
# a rerun on the same warm machine continues the report of the previous call ($OUT starts empty)
[ -f "$STEM.json" ] || [ ! -f "$WORK/last/$(basename "$STEM").json" ] || cp "$WORK/last/$(basename "$STEM").json" "$STEM.json"
sections=$DEFAULT_SECTIONS
[ -n "${GPU_SECTIONS:-}" ] && sections="dali setup $(echo " $GPU_SECTIONS " | sed -E 's/ (dali|setup) / /g')"
[ -f "$STEM-sections.tsv" ] || printf 'section\tcap_s\tseconds\tstatus\n' >"$STEM-sections.tsv"
echo "benchmarks/gpu.sh: $gpu, sections: $sections; reports: $STEM*"
failed=() skipped=()
for s in $sections; do
    [ -n "${CAP[$s]:-}" ] || { echo "benchmarks/gpu.sh: unknown section $s (sections: ${!CAP[*]})"; failed+=("$s"); continue; }
    cap=${CAP[$s]}
    left=$((TOTAL - SECONDS - GRACE))
    [ "$s" = suites ] || ((cap <= left)) || cap=$left  # never past the total, whatever came before
    if [ "$s" = aug ] && [ "$(. "$WORK/env.sh" 2>/dev/null; echo "${OODFAST_GPU_DALI:-no}")" != yes ]; then
        echo "== aug: SKIPPED: DALI is not importable (make the parts calls of ../shared/tools/device-wheels.sh first)"
        printf '%s\t%s\t0\tskipped (no DALI)\n' "$s" "$cap" >>"$STEM-sections.tsv"
        skipped+=(aug)
        continue
    fi
    if ((cap < 10)); then
        echo "== $s: SKIPPED: no time left within the ${TOTAL} s total"
        printf '%s\t%s\t0\tskipped (no time left)\n' "$s" "$cap" >>"$STEM-sections.tsv"
        failed+=("$s")
        continue
    fi
    echo "== $s (cap ${cap} s) at +${SECONDS} s"
    start=$SECONDS
    timeout -s INT -k "$GRACE" "$cap" bash "$self" --section "$s"
    rc=$?
    status=ok
    ((rc == 0)) || { status="failed (exit $rc)"; ((rc == 124 || rc == 137)) && status="stopped at its cap (exit $rc)"; }
    printf '%s\t%s\t%s\t%s\n' "$s" "$cap" "$((SECONDS - start))" "$status" >>"$STEM-sections.tsv"
    echo "== $s: $status after $((SECONDS - start)) s"
    rm -f "$out"/*.tmp
    [ -f "$STEM.json" ] && cp "$STEM.json" "$WORK/last/"
    [ "$s" = dali ] && continue  # without DALI the aug stage is skipped (and said so), nothing fails
    ((rc == 0)) || failed+=("$s")
    [ "$s" = setup ] && ((rc)) && { echo "benchmarks/gpu.sh: setup failed; nothing else can run"; break; }
done
echo "benchmarks/gpu.sh: done in ${SECONDS} s; sections:"
column -t -s $'\t' "$STEM-sections.tsv" 2>/dev/null || cat "$STEM-sections.tsv"
[ -f "$STEM.md" ] && sed -n '/^## targets/,$p' "$STEM.md"
if ((${#failed[@]})); then
    echo "benchmarks/gpu.sh: FAILED: ${failed[*]} (reports under $out)"
    exit 1
fi
if ((${#skipped[@]})); then
    echo "benchmarks/gpu.sh: passed, but skipped: ${skipped[*]} (reports under $out)"
    exit 3
fi
echo "benchmarks/gpu.sh: all passed; reports under $STEM*"
