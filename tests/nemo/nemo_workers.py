"""Worker for the NeMo 2.0 forward-step test: a stand-in NeMo model around a real megatron-core GPTModel."""

from types import SimpleNamespace

import torch


def fake_gpt_forward_step(model, batch):
    """NeMo's gpt_forward_step: call the model with labels (per-token loss comes back)."""
    return model.module(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])


def nemo_step_worker(rank, world_size):
    from otr_megatron import OTRConfig
    from otr_megatron.mcore import GPTBuildConfig, build_gpt_model, disable_otr, enable_otr, forward_step, set_iteration
    from tests.harness import causal_mask, init_parallel, synthetic_batch
    from otr_megatron.nemo.step import STATS_KEY, otr_forward_step, otr_report

    init_parallel(tp=1)
    cfg = GPTBuildConfig(vocab_size=250, seq_length=16, hidden_size=32, num_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    mc = build_gpt_model(cfg)
    otr = OTRConfig(num_samples=8, seed=11)
    batch = synthetic_batch(step=5, batch_size=2, seq_len=16, vocab_size=250)
    batch.pop("step")
    batch["position_ids"] = torch.arange(16)[None].expand(2, 16).contiguous()
    batch["attention_mask"] = causal_mask(16)
    nemo_model = SimpleNamespace(module=mc, config=SimpleNamespace(forward_step_fn=fake_gpt_forward_step, vocab_size=250),
                                 _trainer=SimpleNamespace(global_step=5), tokenizer=None)
    b = dict(batch)
    out = otr_forward_step(nemo_model, b, otr_config=otr, ranks=(0, 1, 0, 1))
    mask = b["loss_mask"]
    loss = float((out * mask).sum())
    report = {k: v.tolist() for k, v in otr_report(b, out).items()}

    disable_otr(mc)
    enable_otr(mc, otr, vocab_size=250)
    set_iteration(mc, 5)
    ref_out, ref_fn = forward_step(iter([dict(batch, step=5)]), mc)
    ref_loss, _, ref_report = ref_fn(ref_out)
    return {"loss": loss, "ref_loss": float(ref_loss), "report": report,
            "ref_report": {k: v.tolist() for k, v in ref_report.items()}, "has_stats": STATS_KEY in b}
