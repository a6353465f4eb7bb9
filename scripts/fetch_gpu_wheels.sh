#!/usr/bin/env bash
# Run on the CPU machine before a GPU run: downloads the cp312 manylinux wheels of what the GPU
# image lacks for scripts/gpu_check.sh (megatron-core for the Megatron CE baselines, liger-kernel
# for Liger's CE) into .gpu_wheels/ (git-ignored; carried to the GPU machine, 64 MiB limit).
# The image already has torch, triton, numpy and packaging, hence --no-deps.
# Transformer Engine is not fetched: its core wheel alone is ~276 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$DEST"
# pip matches manylinux tags exactly: list the ones these wheels use; 'any' admits pure-python wheels
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" 'megatron-core==0.16.1' 'liger-kernel==0.8.5'
ls -l "$DEST"
kib=$(du -sk "$DEST" | cut -f1)
echo "$DEST: ${kib} KiB"
if [ "$kib" -gt $((48 * 1024)) ]; then
  echo "error: $DEST is ${kib} KiB; the GPU run carries at most 64 MiB with the working tree" >&2
  exit 1
fi
