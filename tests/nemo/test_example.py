"""examples/nemo2_recipe_otr.py: compiles, and without NeMo 2.x stops with the Bridge pointer."""

import py_compile
import subprocess
import sys
import os
from pathlib import Path

import pytest

from otr_megatron.nemo import NeMoVersionError, check_nemo_version

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "nemo2_recipe_otr.py"


def test_compiles():
    py_compile.compile(str(EXAMPLE), doraise=True)


def test_without_nemo2_points_to_bridge():
    try:
        check_nemo_version()
        pytest.skip("NeMo 2.x with LLM collections is installed: the example would submit")
    except NeMoVersionError:
        pass
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, str(EXAMPLE), "--dryrun"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "otr-megatron bridge" in res.stderr
