#!/usr/bin/env bash
# GPU acceptance check of the Triton backend, one prepared run (< 8 minutes on one H100/H200;
# Python 3.12, torch 2.11, triton 3.6, numpy 2.5, no megatron-core, no Liger, no network):
#   1. installs the carried wheels of scripts/fetch_gpu_wheels.sh (.gpu_wheels/) offline, if present;
#   2. runs tests/core/test_triton_backend.py on the compiled kernels (TRITON_INTERPRET=0);
#   3. runs the benchmark (python -m otr_megatron.bench_gpu): ratios to Megatron's fused CE,
#      TB/s, peak memory, per-kernel bandwidth against copy bandwidth, the torch path too;
#      writes OUTDIR/bench_gpu.json (the README table is made from it) and the logs.
# Usage: bash scripts/gpu_check.sh [OUTDIR]            default OUTDIR: $OUT if set, else gpu_results
#        bash scripts/gpu_check.sh --dry-run [OUTDIR]  CPU, Triton interpreter, tiny sizes (CI runs it)
# Exit status: non-zero if the tests or the benchmark failed (targets missed are reported, not fatal).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-gpu_results}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SITE="${TMPDIR:-/tmp}/otr_gpu_site"
if ls .gpu_wheels/*.whl >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu_wheels/*.whl || { echo "error: installing .gpu_wheels failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  [ "$DRY" = 0 ] && echo "no .gpu_wheels/ (scripts/fetch_gpu_wheels.sh): Megatron and Liger baselines are skipped"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package is not installed there
"$PY" - <<'PYEOF'
import importlib, platform, torch, triton, numpy
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} numpy {numpy.__version__}")
print("cuda:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for m in ("megatron.core", "liger_kernel", "transformer_engine"):
    try:
        importlib.import_module(m)
        print(f"{m}: importable")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__}: {e})")
PYEOF
rc=0
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  timeout 900 "$PY" -m otr_megatron.bench_gpu --dry-run --out "$OUTDIR/bench_gpu.json" 2>&1 \
    | tee "$OUTDIR/bench.log" || rc=$?
  exit $rc
fi
export TRITON_INTERPRET=0
echo "=== 1/2 compiled-kernel tests ==="
timeout 210 "$PY" -m pytest tests/core/test_triton_backend.py -q -rfE -p no:cacheprovider -W ignore::UserWarning 2>&1 \
  | tee "$OUTDIR/tests.log" || rc=$?
echo "=== 2/2 benchmark ==="
timeout 250 "$PY" -m otr_megatron.bench_gpu --out "$OUTDIR/bench_gpu.json" 2>&1 | tee "$OUTDIR/bench.log" \
  || rc=$((rc ? rc : $?))
echo "gpu_check exit status: $rc"
exit $rc
