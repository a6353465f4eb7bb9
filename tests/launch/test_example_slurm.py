"""examples/slurm_70b.py renders a valid 70B submission from configs/llama3_70b_4node.yaml."""

import os
import runpy
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fake_slurm"


def test_slurm_70b_renders(tmp_path, monkeypatch):
    out = tmp_path / "otr-70b.sbatch"
    mod = runpy.run_path(str(REPO / "examples" / "slurm_70b.py"))
    assert mod["main"](["--account", "acct", "-o", str(out)]) == 0
    text = out.read_text()
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --requeue" in text
    cfg = yaml.safe_load((REPO / "configs" / "llama3_70b_4node.yaml").read_text())
    assert cfg["bridge"]["recipe"] in text and "otr.num_samples=256" in text
    assert "--nproc_per_node=8" in text and "--container-image=nvcr.io/nvidia/nemo:26.08" in text
    assert "model.tensor_model_parallel_size=8" in text and "model.pipeline_model_parallel_size=4" in text
    # Submission goes through sbatch (a test double here).
    monkeypatch.setenv("PATH", f"{FAKE}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert mod["main"](["--account", "acct", "-o", str(out), "--submit"]) == 0
