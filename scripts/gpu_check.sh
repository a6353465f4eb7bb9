#!/usr/bin/env bash
# GPU acceptance check of the Triton backend, one prepared run (< 8 minutes on one H100/H200;
# Python 3.12, torch 2.11, triton 3.6, numpy 2.5, no megatron-core, no Liger, no network):
#   0. installs the carried wheels of scripts/fetch_gpu_wheels.sh (.gpu_wheels/) offline; a required
#      baseline (megatron-core, liger-kernel) that does not import then fails the run (exit 3);
#   1. runs tests/core/test_triton_backend.py on the compiled kernels (TRITON_INTERPRET=0);
#   2. runs python -m otr_megatron.bench_gpu: the CUDA-graph check (forward + backward captured with
#      a 0-dim int64 device step, replayed, equal to eager calls), a short sweep of each Triton
#      kernel's launch settings (num_warps, tile sizes; the picks are used and recorded), then the
#      benchmark: ratios to Megatron's fused CE, TB/s, peak memory, per-kernel bandwidth against copy
#      bandwidth, the torch path too; then the output layer + loss (N=8192, d=4096, per V/tp: matmul +
#      Megatron's CE, matmul + unfused OTR, fused vocab_parallel_linear_otr_loss: time, peak memory).
#      OUTDIR/bench_gpu.json is rewritten after every measurement (a run cut short keeps what it
#      measured); the logs go next to it.
# Time budget (seconds): wheels ~20, tests 150, benchmark 290 (graph check ~20, sweep <= 75,
# two V/tp sizes ~150, output layer ~25); each stage has its own timeout, the whole script stays
# under 480.
# Usage: bash scripts/gpu_check.sh [OUTDIR]            default OUTDIR: $OUT if set, else gpu_results
#        bash scripts/gpu_check.sh --dry-run [OUTDIR]  CPU, Triton interpreter, tiny sizes (CI runs it)
# REQUIRE_BASELINES overrides the required baselines (default: "megatron liger"; dry run: "megatron",
# what CI installs).
# Exit status: non-zero if a required baseline is missing (3), the tests or the benchmark failed, or
# the graph check failed (4); targets missed are reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-gpu_results}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then REQUIRE="${REQUIRE_BASELINES-megatron}"; else REQUIRE="${REQUIRE_BASELINES-megatron liger}"; fi
SITE="${TMPDIR:-/tmp}/otr_gpu_site"
if [ "$DRY" = 0 ] && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpu_wheels/*.whl || { echo "error: installing .gpu_wheels failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package is not installed there
REQUIRE="$REQUIRE" "$PY" - <<'PYEOF'
import importlib, os, platform, sys
import numpy, torch, triton
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} numpy {numpy.__version__}")
print("cuda:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
modules = {"megatron": "megatron.core", "liger": "liger_kernel", "te": "transformer_engine"}
required = os.environ["REQUIRE"].split()
missing = []
for name, m in modules.items():
    try:
        importlib.import_module(m)
        print(f"{m}: importable")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__}: {e})")
        if name in required:
            missing.append(m)
if missing:
    print(f"error: required baseline(s) {', '.join(missing)} do not import; run scripts/fetch_gpu_wheels.sh "
          "before the GPU run (or set REQUIRE_BASELINES)", file=sys.stderr)
    sys.exit(3)
PYEOF
pre=$?
if [ "$pre" != 0 ]; then echo "gpu_check exit status: $pre"; exit "$pre"; fi
rc=0
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  # shellcheck disable=SC2086
  timeout 900 "$PY" -m otr_megatron.bench_gpu --dry-run --out "$OUTDIR/bench_gpu.json" --require-baselines $REQUIRE \
    2>&1 | tee "$OUTDIR/bench.log" || rc=$?
  echo "gpu_check exit status: $rc"
  exit $rc
fi
export TRITON_INTERPRET=0
echo "=== 1/2 compiled-kernel tests ==="
timeout 150 "$PY" -m pytest tests/core/test_triton_backend.py -q -rfE -p no:cacheprovider -W ignore::UserWarning 2>&1 \
  | tee "$OUTDIR/tests.log" || rc=$?
echo "=== 2/2 graph check, launch sweep, benchmark ==="
# shellcheck disable=SC2086
timeout 300 "$PY" -m otr_megatron.bench_gpu --out "$OUTDIR/bench_gpu.json" --budget-s 290 --sweep-s 75 \
  --require-baselines $REQUIRE 2>&1 | tee "$OUTDIR/bench.log" || rc=$((rc ? rc : $?))
echo "gpu_check exit status: $rc"
exit $rc
