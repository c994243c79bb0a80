#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the GPU machine lacks for bench/device/run.sh: litpipe itself, open_clip
# and its ftfy, pydantic, braceexpand, jsonschema for Ray, at the versions of this checkout's .venv, as
# CPython 3.12 manylinux x86_64 wheels; and a slim Ray (../shared/device/slim-ray.sh). Run here, where pip
# reaches PyPI, from the repository root; then carry `.whl` in the device call (64 MiB in all).
set -eu
cd "$(dirname "$0")/../.."
venv=${VENV_PYTHON:-.venv/bin/python}
mkdir -p .whl
version() { "$venv" -c "import importlib.metadata as m; print(m.version('$1'))"; }
specs=""
for name in open_clip_torch ftfy wcwidth pydantic pydantic_core annotated_types typing_inspection braceexpand \
            jsonschema jsonschema_specifications referencing rpds_py; do
    specs="$specs $name==$(version "$name")"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $specs
"$venv" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
../shared/device/slim-ray.sh "$(version ray)" .whl 312
du -sh .whl
