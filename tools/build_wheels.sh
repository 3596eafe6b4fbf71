#!/usr/bin/env bash
# Build every package's wheel into .wheels/ (for the GPU machine, which has no build tools).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .wheels && mkdir -p .wheels
for p in packages/*/; do
  python3 -m build -q --wheel --outdir .wheels "$p" >/dev/null
done
ls .wheels
