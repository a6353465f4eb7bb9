"""scripts/gpu_check.sh --dry-run (CPU, Triton interpreter, tiny sizes): the GPU acceptance script
and its benchmark run end to end, every stage runs (graph check, launch sweep, methods, kernels),
the JSON report has what the README table is made from, and a baseline the run requires fails it
instead of being skipped. Speed is only measured on a GPU (scripts/gpu_check.sh without the flag)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed; scripts/setup_env.sh installs it")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
ROOT = SCRIPT.parents[1]


def _env(**extra):
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
def test_dry_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and not report["errors"], report["errors"]
    assert report["dry_run"] and report["tokens"] == 2 and report["copy_TBps"] > 0
    # the dry run requires the baseline CI installs: megatron-core ran, none was skipped
    assert report["required_baselines"] == ["megatron"] and report["baselines_missing"] == {}
    (shard,) = report["shards"]
    assert shard["repeats_done"] == report["repeats"]
    methods = {r["method"]: r for r in shard["methods"]}
    for est in ("sample K=8", "expected", "sft", "dft"):
        for backend in ("triton", "torch"):
            row = methods[f"OTR {est} [{backend}]"]
            assert row["ms"] > 0 and row["eff_TBps_6B"] > 0
    assert methods["megatron fused CE"]["vs_megatron_fused"] == 1.0 and methods["megatron CE"]["ms"] > 0
    assert any("liger CE" in n for n in report["notes"]) or "liger CE" in methods
    kernels = [k["kernel"] for k in shard["kernels"]]
    assert kernels[:2] == ["stats [sample]", "sampler"] and len(kernels) == 10
    # graph check: every estimator and backend, a tensor step giving the int step's loss and gradient
    checks = report["graph_check"]
    assert {(c["estimator"], c["backend"]) for c in checks} == {
        (e, b) for e in ("sample", "expected", "sft", "dft") for b in ("triton", "torch")}
    assert all(c["ok"] and c["step5_loss_equal"] and c["step6_loss_equal"] for c in checks), checks
    # launch sweep: each kernel's default, its candidates (each checked against the default), a pick
    sweep = report["launch_sweep"]["256"]
    assert set(sweep) == {"stats [sample]", "stats [dense]", "sampler", "grad"}
    for key, entry in sweep.items():
        assert entry["default"]["num_warps"] >= 1 and entry["default_ms"] > 0, key
        assert entry["candidates"], key
        assert any({"num_warps"} == set(c["override"]) for c in entry["candidates"]), key
        assert all("matches_default" in c or "error" in c for c in entry["candidates"]), key
        assert isinstance(entry["pick"], dict)
    assert report["launch_picks"]["256"] == {k: e["pick"] for k, e in sweep.items()} == shard["launch_overrides"]
    # the output layer + loss: matmul + Megatron's CEs, matmul + unfused OTR, the fused path per chunk size
    (lin,) = report["linear"]
    assert lin["shard"] == 256 and lin["hidden"] == report["hidden"] and lin["repeats_done"] == report["repeats"]
    kinds = [r["kind"] for r in lin["methods"]]
    assert kinds == ["baseline", "baseline", "unfused"] + ["fused"] * len(lin["chunks"]) and len(lin["chunks"]) == 2
    assert all(r["ms"] > 0 and r["vs_unfused"] > 0 for r in lin["methods"])
    assert "output layer + loss" in proc.stdout and "fused OTR K=8 c=1 [triton]" in proc.stdout
    assert set(report["stage_seconds"]) >= {"graph check", "sweep V/tp=256", "methods V/tp=256",
                                            "output layer V/tp=256", "total"}
    assert "OTR sft [triton]" in proc.stdout and "wrote" in proc.stdout
    assert (tmp_path / "bench.log").read_text().count("OTR ") >= 8


def test_a_missing_required_baseline_fails_the_script(tmp_path):
    """A baseline that does not import fails before any timing (exit 3), in the script's preflight."""
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=_env(REQUIRE_BASELINES="megatron liger te"))
    try:
        import liger_kernel  # noqa: F401
        import transformer_engine  # noqa: F401
    except ImportError:
        assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "required baseline" in proc.stderr and not (tmp_path / "bench_gpu.json").exists()
    else:
        pytest.skip("liger-kernel and Transformer Engine both import here: nothing is missing")


def test_bench_gpu_itself_refuses_a_missing_required_baseline(tmp_path, monkeypatch):
    """The benchmark checks too (exit 3) and says why in the JSON it writes at once."""
    from otr_megatron import bench_gpu

    monkeypatch.setitem(bench_gpu.BASELINE_MODULES, "liger", "otr_megatron_no_such_module")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "r.json"
    assert bench_gpu.main(["--dry-run", "--out", str(out), "--require-baselines", "liger"]) == 3
    report = json.loads(out.read_text())
    assert list(report["baselines_missing"]) == ["liger"] and not report["complete"]
    assert "required baseline liger" in report["errors"][0]
