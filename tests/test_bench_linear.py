"""python -m otr_megatron.bench_linear at a tiny shape (TP=1 and a real gloo TP=2): every method runs,
the table and the JSON have their columns and targets. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_prints_and_writes_every_method(tmp_path):
    out = tmp_path / "linear.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "otr_megatron.bench_linear", "--tokens", "48", "--hidden", "16",
           "--vocab", "256", "--tp", "1", "2", "--num-samples", "4", "--chunk-tokens", "8", "32", "--repeats", "1",
           "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["header"]["tp"] for r in results] == [1, 2]
    for res in results:
        h = res["header"]
        assert h["shard"] == 256 // h["tp"] and h["tokens"] == 48 and h["hidden"] == 16
        chunks = sorted({8, 32, h["default_chunk"]})
        names = [r["method"] for r in res["rows"]]
        assert names[:2] == ["megatron CE", "OTR K=4 unfused"]
        assert [r["chunk"] for r in res["rows"][2:]] == chunks
        for r in res["rows"]:
            assert r["ms"] > 0 and r["peak_extra_mib"] > 0 and r["time_vs_ce"] > 0
        for r in res["rows"][2:]:
            assert r["time_vs_unfused"] > 0 and r["mem_vs_unfused"] > 0
            assert isinstance(r["meets_time_target"], bool) and isinstance(r["meets_memory_target"], bool)
        assert sum(r["default_chunk"] for r in res["rows"]) == 1
    assert proc.stdout.count("TP=") == 2 and proc.stdout.count("K=4: chunks meeting both targets") == 2
    assert "OTR K=4 fused c=8 " in proc.stdout and "peak extra MiB" in proc.stdout
