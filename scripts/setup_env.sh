#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch (CPU wheel), megatron-core and this package.
#   MCORE=0.16.1 (default) -> .venv          plain install; megatron-core 0.16 supports Python 3.10+
#   MCORE=0.19.2           -> .venv-mcore019  0.17+ declare Python >= 3.12: forced install on 3.11
# Both lines also get Triton 3.6 (the Triton backend's kernels run in its interpreter on CPU in CI)
# with numpy < 2.4: triton 3.6's interpreter fails with numpy >= 2.4.
# Prints the environment's directory on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE="${MCORE:-0.16.1}"
PY="${PYTHON:-python3}"
case "$MCORE" in
  0.16.*) VENV=.venv ;;
  *) VENV=".venv-mcore$(echo "$MCORE" | cut -d. -f1,2 | tr -d .)" ;;
esac
stamp="$VENV/.otr-installed-$MCORE"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup_env.sh -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip="$VENV/bin/python -m pip install -q --disable-pip-version-check"
  $pip 'torch==2.13.0'
  case "$MCORE" in
    0.16.*) $pip "megatron-core==$MCORE" -e '.[test,train,nemo-run]' 'triton==3.6.0' 'numpy>=2,<2.4' ;;
    *)
      $pip 'numpy>=2,<2.4' 'packaging>=24.2'
      $pip --no-deps --ignore-requires-python "megatron-core==$MCORE"
      $pip 'triton==3.6.0'  # megatron-core 0.19 imports triton unconditionally; our kernels need it too
      # setup.py's install_requires + [test,train] extras, minus torch/megatron-core (installed above)
      $pip PyYAML tqdm psutil 'pytest>=7' 'datasets>=2.18' matplotlib scipy 'numpy>=2,<2.4'
      $pip --no-deps -e . ;;
  esac
  touch "$stamp"
fi
echo "$VENV"
