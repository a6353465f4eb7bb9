"""The NeMo 2.0 example compiles and, without NeMo 2.x, stops with the Bridge pointer (the real NeMo
loop is exercised by test_real_nemo.py and, through `otr-megatron nemo`, by test_nemo_cli.py)."""

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from otr_megatron.nemo import NeMoVersionError, check_nemo_version

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "examples" / "nemo2_recipe_otr.py"]


def _has_nemo2() -> bool:
    try:
        check_nemo_version()
    except NeMoVersionError:
        return False
    return True


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_compiles(example):
    py_compile.compile(str(example), doraise=True)


@pytest.mark.parametrize("example,args", [(EXAMPLES[0], ["--dryrun"])], ids=["nemo2_recipe_otr"])
def test_without_nemo2_points_to_bridge(example, args):
    if _has_nemo2():
        pytest.skip("NeMo 2.x with LLM collections is installed: the example would run")
    res = _run([example, *args], timeout=120)
    assert res.returncode == 2
    assert "otr-megatron bridge" in res.stderr
