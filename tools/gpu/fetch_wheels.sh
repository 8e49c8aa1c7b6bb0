#!/usr/bin/env bash
# The packages a borrowed GPU machine lacks, as wheels in .whl/ (ignored by git), for `carry: .whl`.
# Its image has torch, transformers, safetensors and tokenizers, but not diffusers.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
ls -la .whl
