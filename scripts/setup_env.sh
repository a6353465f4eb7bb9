#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch (CPU wheel), megatron-core and this package.
#   MCORE=0.16.1 (default)        -> .venv           plain install; megatron-core 0.16 supports Python 3.10+
#   MCORE=0.19.2                  -> .venv-mcore019  0.17+ declare Python >= 3.12: forced install on 3.11
#   MCORE=0.19.2 BRIDGE=0.6.2     -> .venv-bridge062 Megatron-Bridge 0.6.2 (its real training loop runs on CPU)
#   NEMO=2.7.3                    -> .venv-nemo273   NeMo 2.x (nemo.collections.llm) with megatron-core 0.15.3
# The megatron-core lines also get Triton 3.6 (the Triton backend's kernels run in its interpreter on CPU in CI)
# with numpy < 2.4: triton 3.6's interpreter fails with numpy >= 2.4.
# The Bridge and NeMo lines install every package at the exact version in scripts/requirements/<line>.txt
# with --no-deps: both frameworks leave their own dependencies unpinned, and their full dependency lists
# (Transformer Engine, flash-attn, ...) are neither installable nor needed on CPU.
# Prints the environment's directory on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BRIDGE="${BRIDGE:-}"
NEMO="${NEMO:-}"
if [ -n "$BRIDGE" ] && [ -n "$NEMO" ]; then
  echo "setup_env.sh: BRIDGE=$BRIDGE and NEMO=$NEMO: set one of them (they need different megatron-core versions)" >&2
  exit 2
fi
if [ -n "$BRIDGE" ]; then
  MCORE="${MCORE:-0.19.2}"; LINE="bridge-$BRIDGE"; NEED_MCORE=0.19.2
  VENV=".venv-bridge$(echo "$BRIDGE" | tr -d .)"
elif [ -n "$NEMO" ]; then
  MCORE="${MCORE:-0.15.3}"; LINE="nemo-$NEMO"; NEED_MCORE=0.15.3
  VENV=".venv-nemo$(echo "$NEMO" | tr -d .)"
else
  MCORE="${MCORE:-0.16.1}"; LINE=""
  case "$MCORE" in
    0.16.*) VENV=.venv ;;
    *) VENV=".venv-mcore$(echo "$MCORE" | cut -d. -f1,2 | tr -d .)" ;;
  esac
fi
if [ -n "$LINE" ]; then
  req="scripts/requirements/$LINE.txt"
  if [ ! -f "$req" ]; then
    echo "setup_env.sh: no pinned package set for $LINE ($req); supported: $(ls scripts/requirements | sed 's/\.txt$//' | tr '\n' ' ')" >&2
    exit 2
  fi
  if [ "$MCORE" != "$NEED_MCORE" ]; then
    echo "setup_env.sh: $LINE is pinned with megatron-core $NEED_MCORE, got MCORE=$MCORE" >&2
    exit 2
  fi
fi
stamp="$VENV/.otr-installed-$MCORE${LINE:+-$LINE}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup_env.sh -nt "$stamp" ] \
   || { [ -n "$LINE" ] && [ "$req" -nt "$stamp" ]; }; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip="$VENV/bin/python -m pip install -q --disable-pip-version-check"
  $pip 'torch==2.13.0'
  if [ -n "$LINE" ]; then
    # megatron-core >= 0.17 and Megatron-Bridge declare Python >= 3.12; they run on 3.11 (see README)
    $pip --no-deps --ignore-requires-python -r "$req"
    $pip --no-deps -e .
  else
    case "$MCORE" in
      0.16.*) $pip "megatron-core==$MCORE" -e '.[test,train,nemo-run]' 'omegaconf==2.3.0' 'triton==3.6.0' 'numpy>=2,<2.4' ;;
      *)
        $pip 'numpy>=2,<2.4' 'packaging>=24.2'
        $pip --no-deps --ignore-requires-python "megatron-core==$MCORE"
        $pip 'triton==3.6.0'  # megatron-core 0.19 imports triton unconditionally; our kernels need it too
        # setup.py's [test,train] extras, minus torch/megatron-core (installed above)
        $pip PyYAML 'omegaconf==2.3.0' tqdm psutil 'pytest>=7' 'datasets>=2.18' matplotlib scipy 'numpy>=2,<2.4'
        $pip --no-deps -e . ;;
    esac
  fi
  touch "$stamp"
fi
echo "$VENV"
