"""Runs examples/mcore_training_loop.py as a user would (its own process, gloo on CPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_example_trains_with_otr_after_ce():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": "29631"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "mcore_training_loop.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"OTR: hit rate ([\d.]+) -> ([\d.]+), lm loss \(label CE\) ([\d.]+) -> ([\d.]+)", out.stdout)
    assert m, out.stdout
    hit0, hit1, ce0, ce1 = map(float, m.groups())
    assert hit1 > hit0 + 0.1 and ce1 < ce0  # OTR keeps improving the copy task
