"""scripts/gpu_check.sh --dry-run (CPU, Triton interpreter, tiny sizes): the GPU acceptance script
and its benchmark run end to end, every method and kernel runs, and the JSON report has what the
README table is made from. Speed is only measured on a GPU (scripts/gpu_check.sh without the flag)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed; scripts/setup_env.sh installs it")


@pytest.mark.slow
def test_dry_run_writes_a_complete_report(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["tokens"] == 2 and report["copy_TBps"] > 0
    (shard,) = report["shards"]
    methods = {r["method"]: r for r in shard["methods"]}
    for est in ("sample K=8", "expected", "sft", "dft"):
        for backend in ("triton", "torch"):
            row = methods[f"OTR {est} [{backend}]"]
            assert row["ms"] > 0 and row["eff_TBps_6B"] > 0
    # megatron-core is installed in CI: both of its cross entropies run and are the baseline
    assert methods["megatron fused CE"]["vs_megatron_fused"] == 1.0 and methods["megatron CE"]["ms"] > 0
    assert any("liger CE" in n for n in report["notes"]) or "liger CE" in methods
    kernels = [k["kernel"] for k in shard["kernels"]]
    assert kernels[:2] == ["stats [sample]", "sampler"] and len(kernels) == 10
    assert "OTR sft [triton]" in proc.stdout and "wrote" in proc.stdout
    assert (tmp_path / "bench.log").read_text().count("OTR ") >= 8
