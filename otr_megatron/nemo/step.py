"""NeMo 2.0 forward step and loss-reduction helpers that do not import NeMo (testable on CPU).

NeMo's `gpt_data_step` has already sliced the batch for context parallelism (zigzag) when the
forward step runs, so the global token keys are rebuilt from the zigzag positions of this CP rank.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

STATS_KEY = "otr_stats"  # per-micro-batch OTR stats travel to the loss reduction inside the batch dict


def nemo_token_keys(batch: dict, *, cp_size: int, cp_rank: int, dp_rank: int, dp_size: int, microbatch: int) -> torch.Tensor:
    """Global token keys [b, s_local] for an already CP-sliced NeMo batch."""
    from otr_megatron.mcore.hook import cp_zigzag_positions, fallback_sample_ids

    b, s_local = batch["labels"].shape
    seq = s_local * cp_size
    sid = batch.get("sample_ids")
    if sid is None:
        sid = fallback_sample_ids(b, dp_rank=dp_rank, dp_size=dp_size, microbatch=microbatch)
    pos = cp_zigzag_positions(seq, cp_size, cp_rank).to(batch["labels"].device)
    return torch.as_tensor(sid, dtype=torch.int64, device=pos.device)[:, None] * seq + pos[None, :]


def _ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.get_context_parallel_rank(), ps.get_context_parallel_world_size())


def _global_step(model) -> Optional[int]:
    trainer = getattr(model, "_trainer", None)
    return int(trainer.global_step) if trainer is not None else None


def otr_forward_step(model, batch: dict, *, otr_config=None, vocab_size: Optional[int] = None,
                     base_step: Optional[Callable] = None, ranks: Optional[tuple] = None):
    """Set the OTR context for this micro-batch, then run the model's usual forward step.

    model: NeMo's GPTModel (LightningModule); `model.module` is the Megatron-Core GPTModel.
    base_step: the wrapped step, default `model.config.forward_step_fn` (NeMo's `gpt_forward_step`,
    which passes labels, so the hooked model returns the per-token OTR loss).
    """
    from otr_megatron.mcore import enable_otr, get_otr_hook, set_iteration, set_otr_context

    inner = model.module
    hook = get_otr_hook(inner)
    if hook is None:
        if otr_config is None:
            raise ValueError("otr_forward_step: OTR is not enabled on model.module and no otr_config was given")
        vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None and getattr(model, "tokenizer", None) is not None:
            vocab = model.tokenizer.vocab_size
        if vocab is None:
            raise ValueError("otr_forward_step: real vocabulary size unknown; set config.vocab_size or a tokenizer")
        hook = enable_otr(inner, otr_config, vocab_size=int(vocab))
    step = _global_step(model)
    if step is None:
        step = hook.iteration
    if step != hook.iteration or not getattr(hook, "_nemo_started", False):
        set_iteration(inner, step)
        hook._nemo_started = True
    dp_rank, dp_size, cp_rank, cp_size = ranks or _ranks()
    keys = nemo_token_keys(batch, cp_size=cp_size, cp_rank=cp_rank, dp_rank=dp_rank, dp_size=dp_size,
                           microbatch=hook.microbatch)
    hook.microbatch += 1
    set_otr_context(inner, step=step, token_keys=keys, loss_mask=batch.get("loss_mask"))
    base = base_step or model.config.forward_step_fn
    out = base(model, batch)
    stats = hook.pop_stats()
    if stats is not None:
        batch[STATS_KEY] = {"stats": stats, "num_samples": int(getattr(hook.cfg, "num_samples", 0))}
    return out


def otr_report(batch: dict, forward_out: torch.Tensor) -> dict:
    """OTR metrics of one micro-batch as `[sum, count]` tensors (NeMo/Megatron reduction format)."""
    entry = batch.get(STATS_KEY)
    if not entry or "loss_mask" not in batch or not torch.is_tensor(forward_out):
        return {}
    from otr_megatron.mcore.training import loss_func

    _, _, report = loss_func(batch["loss_mask"], forward_out, stats=entry["stats"],
                             num_samples=entry["num_samples"] or None, check_finite=False)
    return {k: v for k, v in report.items() if k != "lm loss"}


def sequence_normalized_batch(batch: dict, *, cp_group=None) -> dict:
    """The batch NeMo's MaskedTokenLossReduction should see for normalization="sequence".

    NeMo reduces each micro-batch to sum(loss * loss_mask) / sum(loss_mask) (with CP: divided by
    `num_valid_tokens_in_ub` and all-reduced over the CP group), then averages micro-batches. Giving
    it the loss mask weighted 1/length per row, and the number of rows with supervised tokens as
    `num_valid_tokens_in_ub`, turns that into the mean over the micro-batch's sequences, so NeMo's
    mean over micro-batches is the global per-sequence mean whenever micro-batches hold equally
    many supervised sequences (unpacked rows). The batch here is already CP-sliced, so row lengths
    are all-reduced over `cp_group`. Packed (THD) batches raise: their sequences cannot be recovered
    exactly after NeMo's slicing.
    """
    if "cu_seqlens" in batch or "cu_seqlens_q" in batch:
        raise NotImplementedError(
            "otr normalization='sequence' with packed (THD) NeMo batches is not supported: NeMo averages "
            "micro-batch means, which is exact per sequence only for unpacked rows; use normalization='token' "
            "or unpacked data")
    mask = batch["loss_mask"]
    lengths = (mask != 0).sum(dim=1).to(torch.float32)
    if cp_group is not None:
        torch.distributed.all_reduce(lengths, group=cp_group)
    weights = torch.where(mask != 0, mask.float() / lengths.clamp(min=1.0)[:, None], torch.zeros_like(mask, dtype=torch.float32))
    out = dict(batch)
    out["loss_mask"] = weights
    out["num_valid_tokens_in_ub"] = (lengths > 0).sum().to(torch.float32)
    return out


def reduce_otr_metrics(per_microbatch: list, group=None) -> dict:
    """Per-token means of the OTR metrics over micro-batches (and over `group` when given)."""
    keys = sorted({k for d in per_microbatch for k in d if k.startswith("otr")})
    out = {}
    for k in keys:
        pairs = [d[k].reshape(-1) for d in per_microbatch if k in d]
        total = torch.stack(pairs).sum(dim=0)
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        if float(total[1]) > 0:
            out[k] = float(total[0] / total[1])
    return out
