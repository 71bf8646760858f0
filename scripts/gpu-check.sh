#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and no network, whose Python already holds a CUDA
# build of torch (and maybe an older transformers), run the `gpu` test tier and short GPU
# benchmarks in under 8 minutes; print a table, write JSON.
#
#   bash scripts/gpu-check.sh --wheels gpu-wheels --out gpu-results [--python python3]
#   bash scripts/gpu-check.sh --dry-run --out /tmp/gpu-dry [--wheels gpu-wheels]    # on a CPU machine
#   bash scripts/gpu-check.sh --dry-run --no-install      # CI: this Python's packages, results in a temp dir
#
# It never installs from the network. It makes a virtual environment under OUT that sees the
# given Python's packages (so its CUDA torch is used as it is) and installs into it, from the local
# folder that scripts/gpu-wheels.sh filled on a networked machine (--no-index), the pinned
# transformers, PyAV, scikit-video, pytest, ...; the given Python is not changed. streamtc itself
# runs from src/ (PYTHONPATH). Steps, each with its own time limit:
#   1. environment: torch, CUDA, the GPU; the wheel folder's Python version against this one
#   2. install the wheels (skipped with --no-install, e.g. when the Python already has them)
#   3. the gpu test tier (pytest -m gpu), junit XML in OUT
#   4. ViT at full depth, fp32 and bf16: unpatched vs STC-Cacher eager, compiled, CUDA graphs
#   5. the pipeline's pre-fill on LLaVA-OV-0.5B: no compression vs STC vs the Pruner alone
# --dry-run (a CPU machine): checks the plumbing only: the wheel folder is resolved with pip's
# --dry-run (nothing installed), the gpu tier is collected (not run), and the benchmarks run tiny
# on the CPU; nothing needs CUDA. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

python_bin="python3"
wheels=""
out=""
dry_run=0
install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python_bin="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --no-install) install=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$out" ] && [ $dry_run -eq 1 ]; then
  out="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry-XXXXXX")"
  echo "gpu-check: results in $out"
elif [ -z "$out" ]; then
  echo "gpu-check: give a directory for the results: --out DIR" >&2
  exit 2
fi
if [ $install -eq 1 ] && [ -z "$wheels" ] && [ $dry_run -eq 0 ]; then
  echo "gpu-check: give the wheel folder made by scripts/gpu-wheels.sh (--wheels DIR), or --no-install" >&2
  exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
[ -n "$wheels" ] && wheels="$(cd "$wheels" && pwd)"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # no step may reach a package index
status_lines=()
failed=0
started=$(date +%s)

# run NAME LIMIT_SECONDS COMMAND...: one step, timed and limited (four times longer in the dry run,
# on a CPU); its output goes to OUT/NAME.log too.
run() {
  local name="$1" limit=$(( $2 * (dry_run ? 4 : 1) )); shift 2
  local t0=$(date +%s) rc
  echo
  echo "[gpu-check] $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="timed out"; elif [ "$rc" -ne 0 ]; then verdict="failed ($rc)"; fi
  [ "$verdict" = "ok" ] || failed=1
  status_lines+=("$(printf '%-24s %-12s %5ss' "$name" "$verdict" "$took")")
}

# 1. environment
"$python_bin" - "$dry_run" <<'EOF' | tee "$out/environment.txt"
import sys
import torch
dry_run = sys.argv[1] == "1"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
elif not dry_run:
    sys.exit("gpu-check: this Python's torch sees no CUDA device (use --dry-run on a CPU machine)")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
if [ -n "$wheels" ] && [ -f "$wheels/python-version" ]; then
  here="$("$python_bin" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  if [ "$(cat "$wheels/python-version")" != "$here" ]; then
    echo "gpu-check: $wheels holds wheels for Python $(cat "$wheels/python-version"), this is $here;" \
         "make the folder with scripts/gpu-wheels.sh --python-version $here" >&2
    exit 2
  fi
fi

# 2. a virtual environment that sees this Python's packages (a .pth file lists its site directories,
# which also works when this Python is itself a venv or conda environment), and the wheels in it:
# installed there, they shadow an older transformers without touching the Python's own packages.
venv="$out/venv"
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv" || { echo "gpu-check: cannot make $venv" >&2; exit 1; }
fi
py="$venv/bin/python"
"$python_bin" -c 'import site, sys, sysconfig
paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
print("\n".join(dict.fromkeys(p for p in paths if p)))' > "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu_check_base.pth"
torch_before="$("$python_bin" -c 'import torch; print(torch.__version__)')"
if [ $install -eq 1 ] && [ -n "$wheels" ]; then
  for file in requirements.txt requirements-no-deps.txt; do
    [ -f "$wheels/$file" ] || { echo "gpu-check: $wheels/$file is missing; fill the folder with scripts/gpu-wheels.sh" >&2; exit 2; }
  done
  pip_mode=()
  [ $dry_run -eq 1 ] && pip_mode=(--dry-run)
  run install 120 bash -c '"$0" -m pip install "${@:3}" --no-index --find-links "$1" -r "$1/requirements.txt" &&
                          "$0" -m pip install "${@:3}" --no-index --find-links "$1" --no-deps -r "$1/requirements-no-deps.txt"' \
    "$py" "$wheels" unused ${pip_mode[@]+"${pip_mode[@]}"}
fi
torch_after="$("$py" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
  echo "gpu-check: torch in the check's environment is $torch_after, not this Python's $torch_before" >&2
  exit 1
fi
"$py" -c 'import transformers, av; print(f"transformers {transformers.__version__}, av {av.__version__}")' \
  | tee -a "$out/environment.txt"

# 3. the gpu test tier
if [ $dry_run -eq 1 ]; then
  run gpu-tests 120 "$py" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests
else
  run gpu-tests 180 "$py" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$out/gpu-tests.xml" tests
fi

# 4.-5. short benchmarks
bench=("$py" scripts/gpu_bench.py)
[ $dry_run -eq 1 ] && bench+=(--dry-run --repeats 1)
run vit-fp32 100 "${bench[@]}" vit --dtype float32 --out "$out"
run vit-bf16 100 "${bench[@]}" vit --dtype bfloat16 --out "$out"
run prefill 60 "${bench[@]}" prefill --dtype float32 --out "$out"

echo
echo "[gpu-check] results ($out)"
"$py" scripts/gpu_bench.py table "$out" | tee "$out/table.txt"
echo
printf '%-24s %-12s %6s\n' step verdict time
printf '%s\n' "${status_lines[@]}" | tee "$out/steps.txt"
echo "total $(( $(date +%s) - started ))s$([ $dry_run -eq 1 ] && echo ' (dry run: nothing ran on a GPU)')"
exit $failed
