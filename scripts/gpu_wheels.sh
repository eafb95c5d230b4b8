#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that has torch, torchvision, timm
# and huggingface_hub but no internet: run here, then bring .whl/ along. regex (open_clip's
# tokenizer) is compiled: its wheel is fetched for the GPU machine's Python (GPU_PYTHON, 3.12).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pip=("${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: -d "$root/.whl")
"${pip[@]}" open_clip_torch webdataset braceexpand ftfy wcwidth
"${pip[@]}" --python-version "${GPU_PYTHON:-3.12}" --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 regex
ls "$root/.whl"
