#!/usr/bin/env bash
# Wheels the GPU kit needs and the lent GPU image lacks (run where a package registry is reachable): diffusers
# at the version ipa_rt is tested with, and those of its requirements the image lacks: importlib_metadata (with
# zipp) and lazy-importer. The image has torch, triton, transformers, huggingface_hub, safetensors, numpy, pillow,
# requests, regex and filelock. For CPython 3.12, manylinux x86-64 (all four are pure-Python wheels).
#
#   bash benchmarks/gpu/wheels.sh DIR        # then carry DIR (default .whl/) with the device tool's run
set -euo pipefail
DIR=${1:-.whl}
DIFFUSERS=${DIFFUSERS_VERSION:-0.42.1}      # what the suite is run with (pip show diffusers)
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$DIR" "diffusers==$DIFFUSERS" "importlib_metadata>=4" "zipp>=3.20" "lazy-importer>=0.1"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"/*.whl
echo "total $((total / 1024)) KiB in $(ls "$DIR"/*.whl | wc -l) wheels (the device tool carries at most 64 MiB)"
[ "$total" -lt $((32 * 1024 * 1024)) ] || { echo "wheels too large: $total bytes" >&2; exit 1; }
