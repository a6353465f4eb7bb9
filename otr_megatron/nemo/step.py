"""NeMo 2.0 forward step and loss-reduction helpers that do not import NeMo (testable on CPU).

NeMo's `gpt_data_step` has already sliced the batch for context parallelism (zigzag) when the
forward step runs, so the global token keys (`mcore.keys.token_keys`) are built from the zigzag
positions of this CP rank.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from otr_megatron.core.checks import check_pending

STATS_KEY = "otr_stats"  # per-micro-batch OTR stats travel to the loss reduction inside the batch dict


def nemo_token_keys(batch: dict, *, cp_size: int, cp_rank: int, fallback_ids: torch.Tensor) -> torch.Tensor:
    """Global token keys [b, s_local] of an already CP-sliced NeMo batch (`mcore.keys.token_keys`:
    the row positions are this CP rank's zigzag positions)."""
    from otr_megatron.mcore.keys import batch_token_keys, cp_zigzag_positions

    seq = batch["labels"].size(1) * cp_size
    pos = cp_zigzag_positions(seq, cp_size, cp_rank).to(batch["labels"].device)
    return batch_token_keys(batch, seq_length=seq, row_positions=pos, fallback_ids=fallback_ids)


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
    from otr_megatron.mcore import OTRBatchContext, enable_otr, get_otr_hook, pop_otr_stats, set_otr_context
    from otr_megatron.mcore.keys import fallback_sample_ids

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
    if hook.microbatch_index(step) == 0: check_pending()  # once per step: deferred input checks
    dp_rank, dp_size, cp_rank, cp_size = ranks or _ranks()
    fallback = fallback_sample_ids(batch["labels"].size(0), dp_rank=dp_rank, dp_size=dp_size,
                                   microbatch=hook.microbatch_index(step))
    keys = nemo_token_keys(batch, cp_size=cp_size, cp_rank=cp_rank, fallback_ids=fallback)
    set_otr_context(inner, OTRBatchContext(step=step, token_keys=keys, loss_mask=batch.get("loss_mask")))
    base = base_step or model.config.forward_step_fn
    out = base(model, batch)
    stats = pop_otr_stats(inner)
    if stats is not None:
        batch[STATS_KEY] = {"stats": stats, "num_samples": int(getattr(hook.cfg, "num_samples", 0))}
    return out


def otr_report(batch: dict, forward_out: torch.Tensor) -> dict:
    """The OTR reports of one micro-batch as `[sum, count]` tensors (`mcore.metrics.OTR_REPORTS`:
    "lm loss" is the label cross entropy, "otr loss" the loss NeMo reduces and backpropagates)."""
    entry = batch.get(STATS_KEY)
    if not entry or "loss_mask" not in batch or not torch.is_tensor(forward_out):
        return {}
    from otr_megatron.mcore.training import loss_func

    _, _, report = loss_func(batch["loss_mask"], forward_out, stats=entry["stats"],
                             num_samples=entry["num_samples"] or None, check_finite=False)
    return report


def sequence_normalized_batch(batch: dict, *, cp_group=None) -> dict:
    """1/length token weights for normalization="sequence" (`OTRMaskedTokenLossReduction`).

    Returns the batch with `loss_mask` weighted 1/length per row (so summing loss * weights gives the
    sum of the rows' own means) and `num_valid_tokens_in_ub`, the number of rows with supervised
    tokens. The batch is already CP-sliced, so row lengths are all-reduced over `cp_group`. Packed
    (THD) batches raise: their sequences cannot be recovered exactly after NeMo's slicing.
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
    """Means of the OTR reports over micro-batches (and over `group` when given)."""
    from otr_megatron.mcore.metrics import reduce_reports, report_means

    return report_means(reduce_reports(per_microbatch, group=group))
