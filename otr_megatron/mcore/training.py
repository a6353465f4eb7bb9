"""Megatron's training contract for OTR: `forward_step` + `loss_func` for the pipeline schedules.

`loss_func(loss_mask, output_tensor)` returns `(loss_sum, num_tokens, report)` like Megatron-LM's
`pretrain_gpt.py`. With `config.calculate_per_token_loss=True` (recommended) the schedule keeps the
sum, accumulates `num_tokens`, and `finalize_model_grads` all-reduces it over DP x CP and scales the
gradients by 1/N: the exact global per-token mean in any layout. Without it, the schedule divides by
the micro-batch's own token count (exact only when counts agree across micro-batches and ranks).
Every report entry is a `[sum, count]` pair so Megatron's logging sums micro-batches, all-reduces
over DP x CP and divides: the logged value is a true mean. The reports are the table in
`metrics.py`: "lm loss" is the label cross entropy, "otr loss" what is backpropagated.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

from otr_megatron.core.checks import check_pending

from otr_megatron.mcore.hook import OTRBatchContext, get_otr_hook, pop_otr_stats, set_otr_context
from otr_megatron.mcore.keys import batch_token_keys, cp_zigzag_positions, fallback_sample_ids
from otr_megatron.mcore.metrics import otr_report


def sequence_weights(loss_mask: torch.Tensor, segment_ids: Optional[torch.Tensor] = None):
    """Token weights for ``normalization="sequence"``, computed on a FULL (pre-CP-split) micro-batch.

    A sequence is a row, or with ``segment_ids`` [b, s] (packed rows: one id per packed sample) a
    (row, segment) pair. Returns ``(weights, starts)``, both [b, s]: ``weights`` is 1/n on each of a
    sequence's n supervised tokens (0 elsewhere); ``starts`` is 1 at its first supervised token.
    Summing ``weights * loss`` and ``starts`` over whatever slices of the micro-batch the ranks hold
    (CP zigzag included) gives exactly sum_s mean_s and the number of sequences, so the schedule's
    division by the global count is the paper's per-sequence mean in any layout.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask: expected [b, s], got {tuple(loss_mask.shape)}")
    b, s = loss_mask.shape
    dev = loss_mask.device
    mask = (loss_mask != 0).reshape(-1)
    if segment_ids is None:
        seg = torch.zeros(b * s, dtype=torch.int64, device=dev)
    else:
        if tuple(segment_ids.shape) != (b, s):
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)}: expected the loss_mask shape {(b, s)}")
        seg = segment_ids.to(device=dev, dtype=torch.int64).reshape(-1)
    row = torch.arange(b, device=dev).repeat_interleave(s)
    _, inv = torch.unique(torch.stack([row, seg], 1), dim=0, return_inverse=True)
    n_seq = int(inv.max()) + 1 if inv.numel() else 0
    counts = torch.zeros(n_seq, device=dev).index_add_(0, inv, mask.float())
    weights = torch.where(mask, 1.0 / counts[inv].clamp(min=1.0), torch.zeros_like(counts[inv]))
    none = b * s
    flat = torch.where(mask, torch.arange(b * s, device=dev), torch.full_like(row, none))
    first = torch.full((n_seq,), none, dtype=torch.int64, device=dev).scatter_reduce_(0, inv, flat, reduce="amin")
    starts = torch.zeros(b * s + 1, dtype=torch.int64, device=dev)
    starts[first] = 1  # sequences without supervised tokens land on the dropped extra slot
    return weights.view(b, s), starts[:-1].view(b, s)


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[1, s] segment ids of a THD-packed row from its cumulative lengths (negative padding ignored)."""
    cu = cu_seqlens.reshape(-1).to(torch.int64)
    cu = cu[cu >= 0]
    pos = torch.arange(int(seq_len), device=cu.device)
    return torch.searchsorted(cu[1:].contiguous(), pos, right=True).view(1, -1)


def _batch_sequence_weights(batch: dict):
    """(weights, starts) of a full micro-batch: segments from [b, s] sample_ids or cu_seqlens."""
    labels = batch["labels"]
    seg = batch.get("sample_ids")
    if not (torch.is_tensor(seg) and tuple(seg.shape) == tuple(labels.shape)):
        seg = None
    cu = batch.get("cu_seqlens")
    if seg is None and torch.is_tensor(cu):
        if labels.size(0) != 1:
            raise ValueError(f"cu_seqlens with a batch of {labels.size(0)} rows: packed (THD) batches have one row")
        seg = segment_ids_from_cu_seqlens(cu, labels.size(1))
    return sequence_weights(batch["loss_mask"], seg)


def check_sequence_normalization(model) -> None:
    """Sequence normalization is exact only when the schedule divides by the global count."""
    from otr_megatron.mcore.hook import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    if not getattr(config, "calculate_per_token_loss", False):
        raise ValueError(
            "otr normalization='sequence' needs calculate_per_token_loss=True in the model config "
            "(Bridge: model.calculate_per_token_loss=true): only then does Megatron's schedule divide by "
            "the global number of sequences; otherwise each micro-batch would be averaged on its own")


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, stats: Optional[dict] = None,
              num_samples: Optional[int] = None, check_finite: bool = True,
              loss_weights: Optional[torch.Tensor] = None, sequence_starts: Optional[torch.Tensor] = None):
    """Masked sum of the per-token loss, the token count, and the `[sum, count]` reports.

    output_tensor: per-token loss [b, s] (what the OTR-enabled GPTModel returns with labels).
    stats: per-token stats of the same micro-batch (`pop_otr_stats`); num_samples: K for the hit
    rate. Reports: the table in `metrics.py` ("lm loss" is the label cross entropy, "otr loss" the
    returned loss). loss_weights / sequence_starts (normalization="sequence", from
    `sequence_weights`): the sum is weighted 1/length per sequence and the count is the number of
    sequences; the other reports stay per token.
    Raises FloatingPointError on a NaN/Inf loss (names rank-local counts so it can be traced).
    """
    if output_tensor.shape != loss_mask.shape:
        raise ValueError(f"output_tensor {tuple(output_tensor.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have the same [b, s] shape")
    if (loss_weights is None) != (sequence_starts is None):
        raise ValueError("loss_weights and sequence_starts go together (both from sequence_weights)")
    for name, t in (("loss_weights", loss_weights), ("sequence_starts", sequence_starts)):
        if t is not None and tuple(t.shape) != tuple(loss_mask.shape):
            raise ValueError(f"{name} {tuple(t.shape)} must have the loss_mask shape {tuple(loss_mask.shape)}")
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float()
    keep = mask != 0
    weighted = losses * mask
    if loss_weights is not None:
        weighted = weighted * loss_weights.reshape(-1).to(weighted)
    loss_sum = torch.sum(torch.where(keep, weighted, torch.zeros_like(losses)))
    n_tok = mask.sum()
    if sequence_starts is not None:
        num_tokens = torch.sum(torch.where(keep, sequence_starts.reshape(-1).to(mask), 0.0)).to(torch.int)
    else:
        num_tokens = n_tok.to(torch.int)
    if check_finite and not bool(torch.isfinite(loss_sum)):
        bad = int((~torch.isfinite(losses) & keep).sum())
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        raise FloatingPointError(
            f"OTR loss is not finite on rank {rank}: sum={loss_sum.item()}, {bad} of "
            f"{int(keep.sum())} supervised tokens non-finite (check the learning rate, the logits "
            "dtype and the labels/vocab_size)"
        )
    report = otr_report(loss_mask, loss_sum, num_tokens, stats, num_samples)
    return loss_sum, num_tokens, report


def _dp_ranks():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _cp_ranks():
    """(rank, size) of this process in its context-parallel group."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()


def slice_batch_for_cp(batch: dict, cp_size: int, cp_rank: int, seq_len: Optional[int] = None) -> dict:
    """Zigzag-slice every [b, s] tensor (and a [b, 1, s, s] attention mask on dim 2) for one CP rank."""
    if cp_size == 1:
        return dict(batch)
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 2 and (seq_len is None or v.size(1 if v.dim() == 2 else 2) == seq_len):
            dim = 2 if (k == "attention_mask" and v.dim() == 4) else 1
            idx = cp_zigzag_positions(v.size(dim), cp_size, cp_rank).to(v.device)
            out[k] = v.index_select(dim, idx)
        else:
            out[k] = v
    return out


def prepare_batch(batch: dict, model, *, step: Optional[int] = None, cp_slice: bool = True) -> dict:
    """Add global token keys, slice for this CP rank, and set the micro-batch's OTR context on `model`.

    batch keys: tokens, labels, loss_mask [b, s]; optional position_ids, attention_mask, step and
    sample_ids, [b] (one sample per row) or [b, s] (per token, packed rows; -1 = padding): the
    global ids that make the keys layout-invariant (`keys.token_keys`). Without them, ids unique
    within the iteration are used (not layout-invariant). step: default the batch's "step", else
    the value of `set_iteration`.
    """
    for k in ("tokens", "labels", "loss_mask"):
        if k not in batch:
            raise KeyError(f"batch: missing {k!r}; expected tokens, labels, loss_mask [b, s] "
                           f"(optional position_ids, attention_mask, sample_ids), got {sorted(batch)}")
    if "token_keys" in batch:  # one formula (keys.token_keys): keys given by the caller would be replaced
        raise ValueError("batch: 'token_keys' is built here from 'sample_ids' (mcore.keys.token_keys); pass "
                         "sample_ids [b] or [b, s] instead of keys")
    hook = get_otr_hook(model)
    b, s = batch["labels"].shape
    out = dict(batch)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(s, dtype=torch.int64, device=batch["labels"].device)[None, :].expand(b, s).contiguous()
    cp_rank, cp_size = _cp_ranks()
    if hook is None:
        return slice_batch_for_cp(out, cp_size, cp_rank) if cp_slice else out
    if step is None:
        step = out.get("step", hook.iteration)
    step = int(step)
    if hook.microbatch_index(step) == 0: check_pending()  # once per step: the earlier steps' deferred input checks
    fallback = None
    if out.get("sample_ids") is None:
        dp_rank, dp_size = _dp_ranks()
        fallback = fallback_sample_ids(b, dp_rank=dp_rank, dp_size=dp_size, microbatch=hook.microbatch_index(step))
    out["token_keys"] = batch_token_keys(out, seq_length=s, fallback_ids=fallback)
    if getattr(hook.cfg, "normalization", "token") == "sequence":
        # from the full micro-batch, before CP slicing: a sequence's length spans every CP rank
        out["otr_loss_weights"], out["otr_sequence_starts"] = _batch_sequence_weights(out)
    if cp_slice:
        out = slice_batch_for_cp(out, cp_size, cp_rank)
    set_otr_context(model, OTRBatchContext(step=step, token_keys=out["token_keys"], loss_mask=out["loss_mask"],
                                           loss_weights=out.get("otr_loss_weights"),
                                           sequence_starts=out.get("otr_sequence_starts")))
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
    if "otr_loss_weights" in b:
        check_sequence_normalization(model)
    out = model(b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"],
                loss_mask=b["loss_mask"])
    hook = get_otr_hook(model)
    k = getattr(hook.cfg, "num_samples", None) if hook is not None else None
    return out, partial(loss_func, b["loss_mask"], stats=pop_otr_stats(model), num_samples=k,
                        loss_weights=b.get("otr_loss_weights"), sequence_starts=b.get("otr_sequence_starts"))
