"""The CPU backend's factory wrappers must not break `with torch.device(...)` (run in a fresh process:
the backend patches torch globally)."""

import subprocess
import sys

import pytest

SCRIPT = """
import torch
from otr_megatron.mcore import enable_cpu_mode
assert enable_cpu_mode(force=True)
with torch.device("meta"):
    made = [torch.arange(3), torch.zeros(2), torch.empty(1), torch.ones(1)]
print(sorted({t.device.type for t in made}))
"""


def test_device_context_still_applies_after_enable():
    """transformers' from_pretrained builds modules under `with torch.device("meta")`; when the wrapped
    factories escaped that context, RoPE's inv_freq buffer came out as uninitialised memory."""
    pytest.importorskip("megatron.core")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['meta']"
