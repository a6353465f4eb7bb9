#!/usr/bin/env bash
# Installs the environment for MCORE (default 0.16.1) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_env.sh | tail -n 1)
"$VENV/bin/python" -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, '| torch', torch.__version__)"
exec "$VENV/bin/python" -m pytest tests "$@"
