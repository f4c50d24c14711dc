#!/usr/bin/env bash
# Build the wheel that benchmarks/gpu.sh installs on the GPU machine:   bash benchmarks/build-gpu-wheel.sh
#
# Writes .whl/oodfast-<version>-py3-none-any.whl (git-ignored; the device tool's `carry` takes ".whl")
# and .whl/SOURCE.json (git SHA, +dirty with uncommitted changes, and a hash of the packaged sources).
# gpu.sh installs the wheel with `pip install --no-deps --no-index --target` (the machine's torch and
# triton stay as they are) only while that hash matches the tree it runs from; otherwise it lays the
# tree out itself. Only one wheel is kept: pip refuses two versions of one package.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
# --no-build-isolation: the build backend (setuptools >= 77) from this environment, no download
"$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>&1 | grep -v "is ignored" || true
ls .whl/oodfast-*.whl >/dev/null
"$python" benchmarks/gpu_install.py record .whl
ls -la .whl
