"""Planning calculator against numbers worked out by hand."""

import dataclasses
import json
import pytest
import yaml
from pathlib import Path

from otr_megatron.planning import (GIB, Layout, LossSettings, ModelDims, activation_bytes_per_layer,
                                   bytes_per_param_mixed_precision, communication_bytes, from_config, loss_memory, plan)
from otr_megatron.planning.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LLAMA3_8B = ModelDims(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=128256, name="llama3_8b")
LLAMA3_70B = ModelDims(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                       num_query_groups=8, vocab_size=128256, name="llama3_70b")


def test_llama3_param_counts():
    # 8B: per layer q,o 4096^2 each, k,v 4096*1024 each, MLP 3*4096*14336, 2 norms; untied embeddings.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert LLAMA3_8B.params_per_layer() == per_layer
    assert LLAMA3_8B.total_params() == 32 * per_layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248
    assert LLAMA3_70B.total_params() == pytest.approx(70.55e9, rel=1e-3)  # the published 70.6e9


def test_qwen_bias_counts():
    q7 = ModelDims(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
                   vocab_size=152064, add_qkv_bias=True)
    assert q7.total_params() == pytest.approx(7.62e9, rel=2e-3)  # Qwen2.5-7B: 7.61e9


def test_bytes_per_param_distributed_optimizer():
    # bf16 weight 2 + fp32 grad 4 + (fp32 master 4 + Adam m 4 + v 4) / d
    assert bytes_per_param_mixed_precision(1, True) == 18
    assert bytes_per_param_mixed_precision(8, True) == 6 + 12 / 8
    assert bytes_per_param_mixed_precision(8, False) == 18


def test_plan_memory_matches_hand_computation():
    lay = Layout(tp=8, pp=4, nodes=4, gpus_per_node=8, seq_length=4096, micro_batch_size=1, global_batch_size=128,
                 sequence_parallel=True)
    b = plan(LLAMA3_70B, lay)
    assert lay.dp == 1 and lay.num_microbatches == 128
    padded = 129024  # 128256 rounded up to a multiple of 128*8
    stage = 20 * LLAMA3_70B.params_per_layer() + padded * 8192 + 8192
    assert b.params_per_gpu == pytest.approx(stage / 8)
    assert b.memory["weights_bf16"] == pytest.approx(2 * stage / 8)
    assert b.memory["optimizer"] == pytest.approx(12 * stage / 8)
    # activations: 20 layers x 4 in-flight micro-batches x s*b*(12h + 4kv + 6f)/tp bytes
    per_layer = 4096 * (12 * 8192 + 4 * 1024 + 6 * 28672) / 8
    assert activation_bytes_per_layer(LLAMA3_70B, lay) == pytest.approx(per_layer)
    assert b.memory["activations"] == pytest.approx(per_layer * 20 * 4)
    assert b.fits()


def test_loss_memory_ce_vs_otr():
    lay = Layout(tp=8, seq_length=8192, micro_batch_size=1, global_batch_size=8, nodes=1)
    m = loss_memory(LLAMA3_70B, lay, LossSettings(num_samples=256, chunk_tokens=1024, chunk_fp32_temporaries=3))
    v = 129024 // 8
    assert m["ce_fp32_softmax"] == 4 * 8192 * v  # fp32 softmax of the whole [tokens, V/tp]
    block = 16  # the loss's block size for the real vocabulary 128256, K = 256: 2**round(log2(501) / 2)
    assert m["otr_chunk_temporaries"] == 3 * 4 * 1024 * v + 8 * 8192 * (v // block)  # + float64 block prefix sums
    assert m["otr_saved"] == 8192 * (8 * 4 + 12 * 256)  # per-token scalars + the [tokens, K] sample list
    assert m["otr_total"] < m["ce_total"]
    default = loss_memory(LLAMA3_70B, lay, LossSettings(num_samples=256))
    assert default["otr_chunk_temporaries"] == 3 * 4 * (2**24 // v) * v + 8 * 8192 * (v // block)
    assert m["otr_total"] < m["ce_total"]


def test_communication_volumes():
    lay = Layout(tp=8, pp=4, cp=2, nodes=8, seq_length=8192, micro_batch_size=1, global_batch_size=16,
                 sequence_parallel=True)
    c = communication_bytes(LLAMA3_70B, lay)
    mb = lay.num_microbatches  # dp=1 -> 16
    act = 2 * 4096 * 8192  # bf16 [s/cp, b, h]
    assert c["tp"] == pytest.approx(act * 7 / 8 * 4 * 20 * mb)
    assert c["pp"] == pytest.approx(2 * act / 8 * mb)
    assert c["cp"] == pytest.approx(6 * (2 * 4096 * 1024 / 8) * 1 * 20 * mb)
    params_local = LLAMA3_70B.total_params(129024) / 32
    assert c["dp"] == pytest.approx(params_local * 6 * 1 / 2)  # RS fp32 grads + AG bf16 params over dp*cp=2


def test_layout_errors():
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        Layout(tp=3, nodes=1).dp
    with pytest.raises(ValueError, match="global_batch_size 9 "):
        Layout(tp=8, nodes=2, global_batch_size=9).num_microbatches
    with pytest.raises(ValueError, match="must divide model.num_attention_heads"):
        plan(LLAMA3_8B, Layout(tp=16, nodes=2, global_batch_size=16))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_plans_and_fits(path):
    cfg = yaml.safe_load(path.read_text())
    if "model" not in cfg or "parallel" not in cfg:
        pytest.skip("not a real-scale layout config")
    assert cfg["executed"] is False  # nothing here was run; flip only with a job record
    dims, lay, loss, name = from_config(cfg)
    b = plan(dims, lay, loss, name=name)
    assert b.fits(), f"{name}: {b.total_otr / GIB:.1f} GiB"
    assert lay.world_size == cfg["cluster"]["nodes"] * 8
    assert cfg["otr"]["num_samples"] == 256 and cfg["otr"]["temperature"] == 1.3 and cfg["otr"]["neg_reward"] == -0.1


def test_cli_table(capsys):
    assert main(["--config", str(CONFIGS / "llama3_70b_4node.yaml")]) == 0
    out = capsys.readouterr().out
    assert "70.55e9 params" in out and "Megatron CE fp32 softmax" in out and "total with OTR" in out
    assert main(["--config", "/nonexistent.yaml"]) == 2


def test_cli_overrides_use_the_shared_grammar(capsys):
    cfg = str(CONFIGS / "llama3_8b.yaml")
    assert main(["--config", cfg, "--json", "parallel.tensor_model_parallel_size=4", "train.micro_batch_size=2"]) == 0
    ours = json.loads(capsys.readouterr().out)[0]
    raw = yaml.safe_load((CONFIGS / "llama3_8b.yaml").read_text())
    raw["parallel"]["tensor_model_parallel_size"], raw["train"]["micro_batch_size"] = 4, 2
    ref = plan(*from_config(raw)[:3])
    assert ours["memory"] == pytest.approx(ref.memory) and ours["comm"] == pytest.approx(ref.comm)
    for bad, msg in (("parallel.tensor_parallel=4", "unknown config key 'parallel.tensor_parallel'; valid keys here: "),
                     ("parallel", "expected KEY=VALUE")):
        assert main(["--config", cfg, bad]) == 2
        assert msg in capsys.readouterr().err


def test_cli_refuses_unresolvable_interpolation(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text((CONFIGS / "llama3_8b.yaml").read_text().replace("seq_length: 4096", "seq_length: ${nope}"))
    assert main(["--config", str(p)]) == 2
    assert "nope" in capsys.readouterr().err


def test_loss_memory_fused_output_layer():
    """otr.fuse_output_layer: no [tokens, V/tp] logits on the last stage, one chunk of them instead."""
    lay = Layout(tp=1, seq_length=8192, micro_batch_size=1, global_batch_size=8, nodes=1)
    v = 151936  # a Qwen-style vocabulary at TP=1 (MoE with expert parallelism instead of TP)
    dims = dataclasses.replace(LLAMA3_70B, vocab_size=v)
    unfused = loss_memory(dims, lay, LossSettings(num_samples=256, chunk_tokens=32))
    fused = loss_memory(dims, lay, LossSettings(num_samples=256, chunk_tokens=32, fuse_output_layer=True,
                                                fused_chunk_tokens=128))
    block = unfused["otr_chunk_temporaries"] - 3 * 4 * 32 * v
    assert fused["otr_fused_chunk"] == 128 * v * 2 + 32 * v * 3 * 4 + block * 128 / 8192
    assert fused["otr_total"] == fused["otr_saved"] + fused["otr_fused_chunk"]
    assert unfused["otr_total"] == unfused["otr_unfused_total"] == fused["otr_unfused_total"]
    assert fused["otr_total"] < 0.2 * unfused["otr_total"]  # 2.3 GiB of bf16 logits gone
    assert unfused["logits_bf16"] == 2 * 8192 * v
