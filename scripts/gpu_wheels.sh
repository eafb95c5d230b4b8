#!/usr/bin/env bash
# The pure-Python wheels scripts/gpu_check.sh installs on a GPU machine that has torch,
# torchvision, timm and huggingface_hub but no internet: run here, then bring .whl/ along.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: -d "$root/.whl" \
    open_clip_torch webdataset braceexpand ftfy wcwidth
ls "$root/.whl"
