#!/usr/bin/env bash
# Installs the environment for one line (scripts/setup_env.sh: MCORE, BRIDGE or NEMO) and runs its tests on CPU.
#   megatron-core lines: the whole suite (real-framework tests skip there: the frameworks are not installed)
#   BRIDGE=0.6.2: the Megatron-Bridge tests (real Bridge loops) and the rendered Bridge job's keys checked
#                 against Bridge's config classes (tests/launch/test_bridge_job.py, skipped without Bridge)
#   NEMO=2.7.3:   the NeMo 2.x tests (real NeMo loops) and the megatron-core tests on megatron-core 0.15
# Extra arguments go to pytest; test paths among them replace the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_env.sh | tail -n 1)
"$VENV/bin/python" -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, '| torch', torch.__version__)"
if [ -n "${BRIDGE:-}" ]; then paths=(tests/bridge tests/launch/test_bridge_job.py)
elif [ -n "${NEMO:-}" ]; then paths=(tests/nemo tests/mcore)
else paths=(tests)
fi
for a in "$@"; do
  case "$a" in tests|tests/*) paths=(); break ;; esac
done
exec "$VENV/bin/python" -m pytest "${paths[@]}" "$@"
