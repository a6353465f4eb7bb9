"""The NeMo 2.x examples: they compile; without NeMo 2.x they stop with the Bridge pointer; with it,
examples/nemo_tiny_cpu.py trains OTR in NeMo's real loop on this CPU and exits 0."""

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from otr_megatron.nemo import NeMoVersionError, check_nemo_version

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "examples" / "nemo2_recipe_otr.py", REPO / "examples" / "nemo_tiny_cpu.py"]


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


@pytest.mark.parametrize("example,args", [(EXAMPLES[0], ["--dryrun"]), (EXAMPLES[1], ["--max-steps", "1"])],
                         ids=["nemo2_recipe_otr", "nemo_tiny_cpu"])
def test_without_nemo2_points_to_bridge(example, args):
    if _has_nemo2():
        pytest.skip("NeMo 2.x with LLM collections is installed: the example would run")
    res = _run([example, *args], timeout=120)
    assert res.returncode == 2
    assert "otr-megatron bridge" in res.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _has_nemo2(), reason="NeMo 2.x LLM API (nemo-toolkit <= 2.7) not installed")
def test_tiny_cpu_example_trains(tmp_path):
    res = _run([EXAMPLES[1], "--max-steps", "2", "--log-dir", tmp_path], timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "otr_megatron NeMo CPU mode" in out
    last = [line for line in out.splitlines() if line.startswith("nemo_tiny_cpu: last step")]
    assert last and all(k in last[0] for k in ("lm loss", "otr loss", "otr hit rate")), out[-2000:]
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard log written"
