"""Hugging Face in, Hugging Face out through the real Megatron-Bridge loop, offline, on CPU.

Runs examples/bridge_hf_roundtrip.py (tiny random Llama written with transformers -> `otr-megatron
bridge` with Bridge's Llama SFT recipe and OTR -> Bridge's HF export) and checks its numbers against
plain transformers; and the recipe without a local directory, offline, fails with a message that
says how to pass one.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# find_spec, not importorskip: importing megatron.bridge on Python 3.11 needs CPU mode's import shims.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None or importlib.util.find_spec("transformers") is None,
                       reason="needs Megatron-Bridge and transformers (Bridge CI line: MCORE=0.19.2 BRIDGE=0.6.2 "
                              "bash scripts/setup_env.sh)"),
]

REPO = Path(__file__).resolve().parents[2]
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))


def test_hf_roundtrip_with_otr(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "bridge_hf_roundtrip.py"), "--workdir",
                           str(tmp_path / "work"), "--train-iters", "3", "--json", str(out)],
                          env=OFFLINE, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    # Bridge's import is exact: Megatron on the original weights reproduces transformers' logits.
    assert r["imported_vs_original_logits_max_abs"] < 1e-5, r
    # The exported model is the fine-tuned Megatron model (logits about 0.6 in size; float32 rounding).
    assert r["exported_vs_megatron_logits_max_abs"] < 1e-5, r
    # The fine-tune happened: every tensor moved, and the logits moved far beyond the round-trip error.
    assert r["same_tensor_names"] and r["tensors_changed"] == r["tensors"] == 21, r
    assert r["finetune_logit_change_max_abs"] > 1000 * max(r["exported_vs_megatron_logits_max_abs"], 1e-7), r
    # The in-loop export (also_save_hf_checkpoint) and AutoBridge.export_ckpt agree bit for bit.
    assert r["exports_identical"], r
    assert "otr loss" in proc.stdout and "mode sft (starts from checkpoint.pretrained_checkpoint=" in proc.stdout


def test_recipe_offline_without_local_model_says_how_to_pass_one(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "otr_megatron", "bridge", "--recipe",
                           "otr_megatron.bridge.hf:llama_sft_cpu_config", "--dry-run"],
                          env=OFFLINE, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # the CLI's one-line error, not a traceback
    assert last.startswith("otr-megatron bridge: --recipe") and "Hugging Face Hub" in last, proc.stderr[-3000:]
    assert "--hf-path DIR" in last, last
