"""Megatron's training contract for OTR: `forward_step` + `loss_func` for the pipeline schedules.

`loss_func(loss_mask, output_tensor)` returns `(loss_sum, num_tokens, report)` like Megatron-LM's
`pretrain_gpt.py`. With `config.calculate_per_token_loss=True` (recommended) the schedule keeps the
sum, accumulates `num_tokens`, and `finalize_model_grads` all-reduces it over DP x CP and scales the
gradients by 1/N: the exact global per-token mean in any layout. Without it, the schedule divides by
the micro-batch's own token count (exact only when counts agree across micro-batches and ranks).
Every report entry is a `[sum, count]` pair so Megatron's logging sums micro-batches, all-reduces
over DP x CP and divides: the logged value is a true per-token mean.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from otr_megatron.mcore.hook import (
    fallback_sample_ids,
    get_otr_hook,
    set_otr_context,
    slice_batch_for_cp,
    token_keys_from_sample_ids,
)

# stats key of the core loss -> (report name, divide by K?)
_STAT_REPORTS = {
    "hits": ("otr hit rate", True),
    "reward_mean": ("otr mean reward", False),
    "reward_sum": ("otr mean reward", False),
    "label_logprob": ("otr label logprob", False),
}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, stats: Optional[dict] = None,
              num_samples: Optional[int] = None, check_finite: bool = True):
    """Masked sum of the per-token loss, the token count, and `[sum, count]` metrics.

    output_tensor: per-token loss [b, s] (what the OTR-enabled GPTModel returns with labels).
    stats: per-token stats of the same micro-batch from the hook; num_samples: K for the hit rate.
    Raises FloatingPointError on a NaN/Inf loss (names rank-local counts so it can be traced).
    """
    if output_tensor.shape != loss_mask.shape:
        raise ValueError(f"output_tensor {tuple(output_tensor.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have the same [b, s] shape")
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float()
    keep = mask != 0
    loss_sum = torch.sum(torch.where(keep, losses * mask, torch.zeros_like(losses)))
    num_tokens = mask.sum().to(torch.int)
    if check_finite and not bool(torch.isfinite(loss_sum)):
        bad = int((~torch.isfinite(losses) & keep).sum())
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        raise FloatingPointError(
            f"OTR loss is not finite on rank {rank}: sum={loss_sum.item()}, {bad} of "
            f"{int(keep.sum())} supervised tokens non-finite (check the learning rate, the logits "
            "dtype and the labels/vocab_size)"
        )
    n = num_tokens.detach().float()
    report = {"lm loss": torch.stack([loss_sum.detach().clone(), n])}
    for key, (name, per_sample) in _STAT_REPORTS.items():
        if not stats or key not in stats:
            continue
        if per_sample and not num_samples:
            continue
        v = stats[key].reshape(-1).float()
        if per_sample:
            v = v / float(num_samples)
        s = torch.sum(torch.where(keep, v * mask, torch.zeros_like(v)))
        report[name] = torch.stack([s.detach(), n])
    return loss_sum, num_tokens, report


def _parallel_ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
            ps.get_context_parallel_rank(), ps.get_context_parallel_world_size())


def prepare_batch(batch: dict, model, *, step: Optional[int] = None, cp_slice: bool = True) -> dict:
    """Add global token keys, slice for this CP rank, and set the OTR context on `model`.

    batch keys: tokens, labels, loss_mask [b, s]; optional position_ids, attention_mask,
    sample_ids [b] (global per-sample ids: make keys layout-invariant), step.
    """
    for k in ("tokens", "labels", "loss_mask"):
        if k not in batch:
            raise KeyError(f"batch: missing {k!r}; expected tokens, labels, loss_mask [b, s] "
                           f"(optional position_ids, attention_mask, sample_ids), got {sorted(batch)}")
    hook = get_otr_hook(model)
    dp_rank, dp_size, cp_rank, cp_size = _parallel_ranks()
    b, s = batch["labels"].shape
    out = dict(batch)
    if "position_ids" not in out or out["position_ids"] is None:
        out["position_ids"] = torch.arange(s, dtype=torch.int64)[None, :].expand(b, s).contiguous()
    if "token_keys" not in out:
        sid = out.get("sample_ids")
        if sid is None:
            mb = hook.microbatch if hook is not None else 0
            sid = fallback_sample_ids(b, dp_rank=dp_rank, dp_size=dp_size, microbatch=mb)
        out["token_keys"] = token_keys_from_sample_ids(torch.as_tensor(sid), s)
    if hook is not None:
        hook.microbatch += 1
    if cp_slice and cp_size > 1:
        out = slice_batch_for_cp(out, cp_size, cp_rank)
    if hook is not None:
        if step is None:
            step = out.get("step", hook.iteration)
        set_otr_context(model, step=int(step), token_keys=out["token_keys"], loss_mask=out["loss_mask"])
    return out


def forward_step(data_iterator, model):
    """`forward_step_func` for `get_forward_backward_func()` (no pipelining, 1F1B, interleaved).

    Every pipeline stage draws its micro-batch from `data_iterator` (dicts, see `prepare_batch`);
    intermediate stages may pass `None` as the iterator. The iteration for the random stream is the
    batch's "step" if present, else the value of `set_iteration(model, it)`.
    """
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # intermediate pipeline stage without data
        out = model(None, None, None)
        return out, partial(loss_func, None)
    b = prepare_batch(batch, model)
    out = model(b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"],
                loss_mask=b["loss_mask"])
    hook = get_otr_hook(model)
    stats = hook.pop_stats() if hook is not None else None
    k = getattr(hook.cfg, "num_samples", None) if hook is not None else None
    return out, partial(loss_func, b["loss_mask"], stats=stats, num_samples=k)
