#!/usr/bin/env bash
# Prepares, on a machine with network, what tests/gpu/check_exllamav2.py needs on a GPU machine
# without any: wheels for its Python (3.12, x86-64) of what its image lacks, and the embedded
# model's config, tokenizer and template. Everything lands in tests/gpu/bundle/ (git-ignored,
# about 20 MB), which travels with the repository. Then, on the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
#       tests/gpu/bundle/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
#   python3 tests/gpu/check_exllamav2.py run tests/gpu/bundle/model
#
# The first import of exllamav2 there compiles its CUDA extension (nvcc + ninja): minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=tests/gpu/bundle
rm -rf "$OUT"
mkdir -p "$OUT/wheels"
# What the sidecar, the openai client and exllamav2 need beyond the GPU image's packages
# (aiohttp, uvloop, jinja2, httpx, anyio, pandas, pillow, rich, pygments, ninja, numpy,
# safetensors, tokenizers, transformers are there already).
WHEELS=(
  orjson==3.13.0 msgspec==0.22.0 pyjwt==2.15.1 cryptography==50.0.2 cffi==2.1.1
  pycparser==3.12 redis==8.1.0 openai==3.57.0 distro==1.9.0 jiter==0.19.0 pydantic==2.14.4
  pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 sniffio==1.3.1
  exllamav2==0.3.2 fastparquet==2024.11.0 cramjam==2.11.0 websockets==15.0.1
)
for wheel in "${WHEELS[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --abi cp312 --abi abi3 \
    --abi none -d "$OUT/wheels" "$wheel"
done
"$PY" tests/gpu/check_exllamav2.py prepare "$OUT/model"
du -sh "$OUT"
