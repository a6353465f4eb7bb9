"""Worker for the Bridge forward-step contract test (runs in a spawned gloo process)."""

from functools import partial
from types import SimpleNamespace

import torch


def fake_bridge_gpt_step(state, data_iterator, model, return_schedule_plan=False):
    """What Bridge's gpt_step.forward_step does, minus Bridge: next(batch), model(..., labels), masked sum."""
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

    def masked_next_token_loss(loss_mask, output_tensor):
        losses = output_tensor.view(-1).float()
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        n = mask.sum().to(torch.int)
        return loss, n, {"lm loss": torch.cat([loss.detach().view(1), n.view(1)])}

    return out, partial(masked_next_token_loss, batch["loss_mask"])


def step_contract_worker(rank, world_size):
    from otr_megatron import OTRConfig
    from otr_megatron.bridge.step import OTRForwardStep
    from otr_megatron.mcore import GPTBuildConfig, build_gpt_model, disable_otr, enable_otr, forward_step, set_iteration
    from tests.harness import causal_mask, init_parallel, synthetic_batch

    init_parallel(tp=world_size)
    cfg = GPTBuildConfig(vocab_size=250, seq_length=16, hidden_size=32, num_layers=1, num_attention_heads=4,
                         tensor_model_parallel_size=world_size)
    torch.manual_seed(0)
    model = build_gpt_model(cfg)
    otr = OTRConfig(num_samples=8, temperature=1.3, neg_reward=-0.1, seed=7)
    batch = synthetic_batch(step=3, batch_size=2, seq_len=16, vocab_size=250)
    batch["position_ids"] = torch.arange(16)[None].expand(2, 16).contiguous()
    batch.pop("step")
    batch["attention_mask"] = causal_mask(16)
    state = SimpleNamespace(train_state=SimpleNamespace(step=3), cfg=SimpleNamespace(model=SimpleNamespace(vocab_size=250)))

    step = OTRForwardStep(otr, base_forward_step=fake_bridge_gpt_step)
    out, loss_fn = step(state, iter([dict(batch)]), model)
    loss, n, report = loss_fn(out)
    loss.backward()

    # Reference: the Megatron-Core integration's own forward_step on the same batch and iteration.
    disable_otr(model)
    enable_otr(model, otr, vocab_size=250)
    set_iteration(model, 3)
    ref_batch = dict(batch, step=3)
    ref_out, ref_loss_fn = forward_step(iter([ref_batch]), model)
    ref_loss, ref_n, ref_report = ref_loss_fn(ref_out)

    errors = []
    try:
        step(state, iter([dict(batch)]), model, return_schedule_plan=True)
    except NotImplementedError as exc:
        errors.append(str(exc))

    # normalization="sequence": Bridge's step and the megatron-core forward_step agree, and differ from token
    seq = dict(vars(otr), normalization="sequence")
    seq_cfg = OTRConfig(**seq)
    disable_otr(model)
    model.zero_grad(set_to_none=True)
    out, loss_fn = OTRForwardStep(seq_cfg, base_forward_step=fake_bridge_gpt_step)(state, iter([dict(batch)]), model)
    seq_loss, seq_n, seq_report = loss_fn(out)
    seq_loss.backward()
    disable_otr(model)
    enable_otr(model, seq_cfg, vocab_size=250)
    set_iteration(model, 3)
    ref_out, ref_loss_fn = forward_step(iter([dict(batch, step=3)]), model)
    seq_ref = ref_loss_fn(ref_out)
    return {
        "seq": {"loss": seq_loss.item(), "n": int(seq_n), "report": {k: v.tolist() for k, v in seq_report.items()}},
        "seq_ref": {"loss": seq_ref[0].item(), "n": int(seq_ref[1]),
                    "report": {k: v.tolist() for k, v in seq_ref[2].items()}},
        "loss": loss.item(), "n": int(n), "report": {k: v.tolist() for k, v in report.items()},
        "ref_loss": ref_loss.item(), "ref_n": int(ref_n), "ref_report": {k: v.tolist() for k, v in ref_report.items()},
        "errors": errors, "grad_finite": all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None),
    }
