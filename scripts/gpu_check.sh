#!/usr/bin/env bash
# The one GPU check: bash scripts/gpu_check.sh OUT_DIR [--smoke] [--parts env,tests,...]
# On one H100/H200 at most 8 minutes (--total; --parts picks fewer); --smoke runs every line on CPU with a tiny model.
# A GPU machine with torch but without internet: run `bash scripts/gpu_wheels.sh` where there is
# internet and bring .whl/ along; the pure-Python dependencies are then installed from it.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR [--smoke] [--parts env,tests,bench,plan,capped,largest,peer_largest,compile,patchify,compile_ratio,e2e] [--budgets part=s,...] [--total s] [--serial]" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
needs="import open_clip, webdataset, braceexpand, regex"  # what the check imports beyond torch
if ! "$python" -c "$needs" 2>/dev/null; then
    if ! ls "$root"/.whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: open_clip, webdataset, braceexpand or regex is missing: pip install -e $root, or without" \
             "internet bring the wheels of 'bash scripts/gpu_wheels.sh' (.whl/)" >&2
        exit 2
    fi
    site="${TMPDIR:-/tmp}/bigbatch-site"
    for wheel in "$root"/.whl/*.whl; do  # one by one: a compiled wheel for another Python is left out
        "$python" -m pip install -q --no-index --no-deps --target "$site" "$wheel" 2>/dev/null \
            || echo "gpu_check: $(basename "$wheel") does not install here (another Python?)" >&2
    done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if ! err="$("$python" -c "$needs" 2>&1)"; then
        echo "gpu_check: still missing after installing .whl/: ${err##*$'\n'}: add its wheel to .whl/" >&2
        exit 2
    fi
fi
"$python" -c "import bigbatch" 2>/dev/null || export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$python" "$here/gpu_check.py" "$@"
