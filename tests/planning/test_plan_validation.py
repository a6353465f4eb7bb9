"""`otr-megatron plan` checks every number before budgeting (issue 17): a zero parallel size, a
negative batch or a bad `otr:` value is one line and exit 2, never a ZeroDivisionError or a budget
of negative memory."""

import os
import subprocess
import sys

import pytest

from otr_megatron.planning import check_config
from otr_megatron.planning.budget import Layout, LossSettings, ModelDims
from otr_megatron.planning.cli import main as plan_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = os.path.join(ROOT, "configs", "llama3_8b.yaml")


@pytest.mark.parametrize("override, words", [
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size=0; expected an integer >= 1"),
    ("parallel.pipeline_model_parallel_size=-1", "parallel.pipeline_model_parallel_size=-1"),
    ("parallel.context_parallel_size=0", "parallel.context_parallel_size=0"),
    ("train.micro_batch_size=-1", "train.micro_batch_size=-1; expected an integer >= 1"),
    ("train.global_batch_size=0", "train.global_batch_size=0"),
    ("train.seq_length=0", "train.seq_length=0"),
    ("cluster.nodes=0", "cluster.nodes=0"),
    ("cluster.gpu_memory_gib=-80", "cluster.gpu_memory_gib=-80"),
    ("model.num_attention_heads=0", "model.num_attention_heads=0"),
    ("model.vocab_size=0", "model.vocab_size=0"),
    ("model.num_query_groups=3", "not divisible by model.num_query_groups=3"),
    ("parallel.sequence_parallel=1", "parallel.sequence_parallel=1; expected true or false"),
    ("otr.num_samples=0", "num_samples must be an integer >= 1, got 0"),
    ("otr.temperature=-5", "temperature (kappa) must be a finite number > 0"),
    ("otr.neg_reward=2", "neg_reward (beta) must be a number in [-1, 0]"),
])
def test_plan_refuses_a_bad_number_in_one_line(override, words, capsys):
    assert plan_main(["--config", CFG, override]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and words in out.err, out.err


def test_plan_cli_has_no_traceback_for_tp_zero():
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "otr_megatron.cli", "plan", "--config", CFG,
                        "parallel.tensor_model_parallel_size=0"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == "", r.stderr


def test_the_calculator_inputs_check_themselves():
    with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size=0"):
        Layout(tp=0)
    with pytest.raises(ValueError, match="train.micro_batch_size=-2"):
        Layout(micro_batch_size=-2)
    with pytest.raises(ValueError, match="train.recompute='some'"):
        Layout(recompute="some")
    with pytest.raises(ValueError, match="otr.num_samples=0"):
        LossSettings(num_samples=0)
    with pytest.raises(ValueError, match="model.hidden_size=100 is not divisible"):
        ModelDims(num_layers=1, hidden_size=100, ffn_hidden_size=8, num_attention_heads=3, num_query_groups=1,
                  vocab_size=10)
    with pytest.raises(ValueError, match="model.num_layers=True"):
        ModelDims(num_layers=True, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2, num_query_groups=1,
                  vocab_size=10)


def test_check_config_uses_the_command_line_node_count():
    from otr_megatron.cli import load_config_dict

    cfg = load_config_dict(CFG)
    check_config(cfg)  # the shipped file is fine
    with pytest.raises(ValueError, match="cluster.nodes=0"):
        check_config(cfg, nodes=0)
    with pytest.raises(ValueError, match="global_batch_size 128 is not divisible"):
        check_config(cfg, nodes=3)  # dp 12 does not divide the global batch
    no_model = {k: v for k, v in cfg.items() if k != "model"}
    check_config(no_model)
    with pytest.raises(ValueError, match="train.micro_batch_size=0"):
        check_config({**no_model, "train": {**no_model["train"], "micro_batch_size": 0}})
    with pytest.raises(ValueError, match="unknown OTR setting otr.num_sample=8"):
        check_config({**no_model, "otr": {"num_sample": 8}})
