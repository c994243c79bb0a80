#!/usr/bin/env bash
# The GPU runbook in one command (bench/device/runbook.py says what it measures). On the device machine,
# from the repository root, with .whl carried (bench/device/wheels.sh fills it here):
#     bash bench/device/run.sh            # writes $OUT/device.json and $OUT/device.md (runs/device without $OUT)
#     bash bench/device/run.sh --dry-run  # CPU, tiny models: what tests/test_device_runbook.py runs
# When a package is missing it installs .whl into a temporary site folder (rerun wheels.sh after changing
# litpipe: its wheel is in there), says what is still missing, then runs every part, each under its own bound.
set -u
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
out=${OUT:-runs/device}
mkdir -p "$out"
if ! "$python" bench/device/runbook.py --check 2>/dev/null && { ls .whl/*.whl >/dev/null 2>&1 || [ -f .whl/ray-slim.zip ]; }; then
    site=$(mktemp -d)
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 3
    fi
    if [ -f .whl/ray-slim.zip ]; then
        unzip -q -o .whl/ray-slim.zip -d "$site" || exit 3
    fi
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
PYTHONUNBUFFERED=1 exec "$python" bench/device/runbook.py --out "$out" "$@"
