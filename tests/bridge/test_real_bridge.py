"""The real Megatron-Bridge loop with OTR, on CPU (gloo), in two launches of 2 processes each.

Skipped where Megatron-Bridge is not installed (the megatron-core CI lines); the Bridge line
(`MCORE=0.19.2 BRIDGE=0.6.2 bash scripts/setup_env.sh`) runs it. What runs is in
`real_bridge_worker.py` (pretrain -> checkpoint -> OTR finetune on SFT data, the equality oracle,
--hf-path) and the `otr-megatron bridge` command under torchrun (YAML + overrides, TP=2).
"""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("megatron.bridge") is None,
                       reason="megatron-bridge is not installed (Bridge CI line: MCORE=0.19.2 BRIDGE=0.6.2 "
                              "bash scripts/setup_env.sh)"),
]

REPO = Path(__file__).resolve().parents[2]
NUM = r"(-?\d+\.\d+E[+-]\d+)"


def _metric(line: str, name: str) -> float:
    m = re.search(rf"\| {re.escape(name)}: {NUM} \|", line)
    assert m, f"{name!r} not in {line!r}"
    return float(m.group(1))


def _console_lines(text: str):
    """(Bridge's training_log lines, OTRConsoleMetrics lines)."""
    lines = text.splitlines()
    # under torchrun two ranks share the pipe: rank 0's block-buffered output may end mid-line just
    # before the last rank's line, so a line is found where it starts, not only at a line start
    return ([ln for ln in lines if "] iteration" in ln and "consumed samples:" in ln],
            [ln[ln.index(" [otr] iteration"):] for ln in lines if " [otr] iteration" in ln])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests import harness as T
    from tests.bridge import real_bridge_worker as W

    return T.launch(W.bridge_runs, 2, str(tmp_path_factory.mktemp("bridge")))


def test_cpu_mode_names_its_shims_and_patches(runs):
    line = runs[0]["cpu_line"]
    for name in ("lora_layers<-transformer_engine.pytorch.ops.Sequential",
                 "pretrain<-nvidia_resiliency_ext.inprocess.CallWrapper", "initialize_megatron(allow_no_cuda=True)",
                 "compile_helpers=no-op", "_set_random_seed with cuda.device_count()=1"):
        assert name in line
    assert ("typing.override" in line) == (sys.version_info < (3, 12))
    assert all(r["stub_modules"] == [] for r in runs)  # the stubs never enter sys.modules: TE probes see it absent


def test_ce_pretrain_then_otr_finetune_from_its_checkpoint(runs):
    for r in runs:
        pre, ft = r["pretrain"], r["finetune"]
        assert len(pre["losses"]) == 2 and all(4.0 < x["lm loss"] < 7.0 for x in pre["losses"])  # ~ln 256 = 5.5
        assert set(pre["losses"][0]) == {"lm loss"}  # Bridge's own CE step
        assert ft["start_sum"] == pre["end_sum"]  # finetune starts from the saved weights, not a fresh init
        assert len(ft["losses"]) == 3
        for x in ft["losses"]:
            assert {"lm loss", "otr loss", "otr hit rate", "otr mean reward"} <= set(x)
            assert all(math.isfinite(v) for v in x.values())
            assert 0.0 <= x["otr hit rate"] <= 1.0 and -0.1 - 1e-6 <= x["otr mean reward"] <= 1.0


def test_console_shows_every_otr_metric(runs):
    console = runs[1]["finetune"]["console"]  # the last rank prints Bridge's line and ours
    bridge_lines, otr_lines = _console_lines(console)
    assert len(bridge_lines) == 3 and len(otr_lines) == 3, console[-3000:]
    for it, (b, o) in enumerate(zip(bridge_lines, otr_lines)):
        assert f"iteration        {it + 1}/       3" in o
        logged = runs[1]["finetune"]["losses"][it]
        for name, line in (("lm loss", b), ("otr hit rate", b), ("otr loss", o), ("otr mean reward", o)):
            assert _metric(line, name) == pytest.approx(logged[name], rel=1e-5, abs=1e-9)
        assert logged["otr mean reward"] < 0 and "otr mean reward" not in b  # what Bridge's line drops
    assert runs[0]["finetune"]["console"].count("[otr]") == 0  # only the last rank prints


@pytest.mark.parametrize("layout", ["oracle_tp2", "oracle_tp1_dp2", "oracle_tp2_fused"])
def test_bridge_loop_equals_mcore_path(runs, layout):
    """Loss, hit rate, mean reward and every gradient of one Bridge iteration equal the project's
    megatron-core path on the same weights and micro-batches (oracle_tp2_fused: Bridge's iteration
    with otr.fuse_output_layer=true against the unfused megatron-core path)."""
    for rank, r in enumerate(runs):
        o = r[layout]
        print(f"{layout} rank {rank}: max|grad diff| {o['grad_max_abs_diff']:.3e} of max|grad| {o['grad_max_abs']:.3e}; "
              + ", ".join(f"{k} {o['bridge'][k]:.9g} vs {o['mcore'][k]:.9g}" for k in sorted(o["mcore"])))
        assert o["weights_unchanged"] and o["microbatches"] == (1 if layout == "oracle_tp1_dp2" else 2)
        for name in ("lm loss", "otr loss", "otr hit rate", "otr mean reward"):
            assert o["mcore"][name] == pytest.approx(o["bridge"][name], rel=1e-6, abs=1e-7), name
        assert o["grad_max_abs"] > 1e-4  # gradients are not trivially zero
        assert o["grad_max_abs_diff"] <= 1e-6 * o["grad_max_abs"]


def test_hf_path_builds_a_llama_recipe_offline(runs):
    hf = runs[0]["hf"]
    assert (hf["num_layers"], hf["hidden_size"]) == (2, 64)  # read from the local config, not the hub's 1B
    assert hf["tokenizer_model"] == hf["hf_dir"]
    assert "--hf-path DIR" in hf["offline_error"] and "meta-llama/Llama-3.2-1B" in hf["offline_error"]


def test_cli_yaml_overrides_tp2_under_torchrun(tmp_path):
    """The command as a user runs it: YAML with an `otr:` section, key=value overrides on top, TP=2, the
    fused output layer switched on from the command line."""
    conf = tmp_path / "otr.yaml"
    conf.write_text(yaml.safe_dump({"otr": {"num_samples": 4, "temperature": 2, "seed": 5},
                                    "train": {"global_batch_size": 2, "micro_batch_size": 1}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "otr_megatron", "bridge",
           "--recipe", "otr_megatron.bridge.recipes:tiny_gpt_cpu_config", "--config", str(conf),
           "train.train_iters=3", "otr.num_samples=8", "model.tensor_model_parallel_size=2",
           "otr.fuse_output_layer=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "CPU mode (no CUDA device)" in out
    assert "mode pretrain (from the recipe's initialization" in out and "tp=2" in out
    assert "OTRConfig(num_samples=8, temperature=2.0, neg_reward=-0.1, estimator='sample', seed=5" in out
    assert "fuse_output_layer=True" in out
    bridge, otr = _console_lines(out)
    assert len(bridge) == 3 and len(otr) == 3
    assert "global batch size:     2" in bridge[-1]  # from the YAML
    for b, o in zip(bridge, otr):
        assert all(math.isfinite(_metric(b, n)) for n in ("lm loss", "otr hit rate"))
        assert all(math.isfinite(_metric(o, n)) for n in ("otr loss", "otr mean reward"))
    assert not list(tmp_path.glob("nemo_experiments/**/checkpoints/iter_*"))  # saving is off by default
