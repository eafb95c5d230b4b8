#!/usr/bin/env bash
# The one GPU check: bash scripts/gpu_check.sh OUT_DIR [--smoke] [--parts env,tests,...]
# On one H100/H200 at most 8 minutes (--total; --parts picks fewer); --smoke runs every line on CPU with a tiny model.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR [--smoke] [--parts env,tests,bench,plan,capped,largest,peer_largest,compile,patchify,e2e] [--budgets part=s,...] [--total s] [--serial]" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
