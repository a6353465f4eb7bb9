"""Global token keys: the one formula that names a token in OTR's random stream.

    key = (sample_id + 1) * seq_length + position

`sample_ids` is either `[b]` (one id per row) or `[b, s]` (one id per token: packed rows, -1 on
padding). `position` is where the token sits in what its id names: the row offset for `[b]` ids,
the position in the packed sample (its `position_ids`, restarting at 0) for `[b, s]` ids. After a
context-parallel split pass the global positions (`cp_zigzag_positions` for row offsets, the sliced
`position_ids` for per-token ids). A key then depends only on which sample and which position a
token is: not on the DP/CP/TP/PP layout, the micro-batching, packing, or a resume. The `+ 1` keeps
padding (id -1) in `[0, seq_length)`, where it can never meet a real token (padding draws nothing).
"""

from __future__ import annotations

from typing import Optional

import torch


def token_keys(sample_ids: torch.Tensor, seq_length: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 keys `[b, s]`: `(sample_ids + 1) * seq_length + positions` (see the module docstring).

    sample_ids: `[b]` or `[b, s]` ids >= -1. seq_length: the full (pre-CP) row length.
    positions: `[s]` or `[b, s]` in `[0, seq_length)`; default `arange(seq_length)`.
    """
    if not torch.is_tensor(sample_ids) or sample_ids.dim() not in (1, 2) or sample_ids.is_floating_point():
        raise ValueError(f"sample_ids: expected an integer tensor [b] or [b, s], got "
                         f"{getattr(sample_ids, 'dtype', type(sample_ids).__name__)} {tuple(getattr(sample_ids, 'shape', ()))}")
    seq = int(seq_length)
    if seq <= 0:
        raise ValueError(f"seq_length={seq_length}: expected a positive sequence length")
    sid = sample_ids.to(torch.int64)
    if positions is None:
        positions = torch.arange(seq if sid.dim() == 1 else sid.size(1), dtype=torch.int64, device=sid.device)
    if not torch.is_tensor(positions) or positions.dim() not in (1, 2) or positions.is_floating_point():
        raise ValueError(f"positions: expected an integer tensor [s] or [b, s], got "
                         f"{getattr(positions, 'dtype', type(positions).__name__)} {tuple(getattr(positions, 'shape', ()))}")
    pos = positions.to(device=sid.device, dtype=torch.int64)
    if pos.dim() == 1:
        pos = pos[None, :]
    if sid.dim() == 1:
        sid = sid[:, None]
    if (sid.dim() == 2 and sid.size(1) != 1 and sid.size(1) != pos.size(1)) or pos.size(0) not in (1, sid.size(0)):
        raise ValueError(f"sample_ids {tuple(sample_ids.shape)} and positions {tuple(positions.shape)}: "
                         "expected [b] or [b, s] ids with [s] or [b, s] positions")
    # range checks on CPU tensors only (what data loaders yield): on a GPU they would cost a host
    # sync per micro-batch
    limit = (2**62) // seq - 1
    check = sid.device.type == "cpu" and sid.numel() and pos.numel()
    bad = torch.stack([(sid < -1).any(), (sid >= limit).any(), (pos < 0).any(), (pos >= seq).any()]) if check else None
    if bad is not None and bool(bad.any()):
        if bad[0] or bad[1]:
            raise ValueError(f"sample_ids: expected ids in [-1, {limit}) (-1 = padding; larger ids x seq_length={seq} "
                             f"overflow int64 keys), got min {int(sid.min())} max {int(sid.max())}")
        raise ValueError(f"positions: expected values in [0, seq_length={seq}), got min {int(pos.min())} "
                         f"max {int(pos.max())}")
    return (sid + 1) * seq + pos


def fallback_sample_ids(batch_size: int, *, dp_rank: int, dp_size: int, microbatch: int) -> torch.Tensor:
    """Per-step-unique `[b]` sample ids when the data carries none: (micro-batch, DP rank, row).

    Unique within an iteration (the iteration itself is the loss's `step`), distinct across DP
    replicas; NOT layout-invariant (they change with DP size / micro-batch size).
    """
    base = (int(microbatch) * int(dp_size) + int(dp_rank)) * int(batch_size)
    return base + torch.arange(int(batch_size), dtype=torch.int64)


def cp_zigzag_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions held by CP rank `cp_rank` under Megatron's zigzag split (chunks r, 2cp-1-r)."""
    if cp_size < 1 or not (0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank={cp_rank}, cp_size={cp_size}: expected 0 <= cp_rank < cp_size")
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len={seq_len}: must be divisible by 2 * cp_size = {2 * cp_size}")
    if cp_size == 1:
        return torch.arange(seq_len, dtype=torch.int64)
    c = seq_len // (2 * cp_size)
    a = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    j = 2 * cp_size - 1 - cp_rank
    b = torch.arange(j * c, (j + 1) * c)
    return torch.cat([a, b]).to(torch.int64)


def batch_token_keys(batch: dict, *, seq_length: int, row_positions: Optional[torch.Tensor] = None,
                     fallback_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keys of a batch dict: its `sample_ids` (`[b]`, `[b, s]` or absent: `fallback_ids`), positions
    from `position_ids` for per-token ids, else `row_positions` (default: the row offsets).

    The one place that picks the positions for each schema (`prepare_batch` and the NeMo step).
    """
    labels = batch["labels"]
    sid = batch.get("sample_ids")
    if sid is None:
        if fallback_ids is None:
            raise ValueError("batch has no sample_ids and no fallback_ids were given")
        sid = fallback_ids
    sid = torch.as_tensor(sid, device=labels.device)
    if sid.dim() == 2:
        if tuple(sid.shape) != tuple(labels.shape):
            raise ValueError(f"sample_ids {tuple(sid.shape)}: per-token ids must have the labels shape "
                             f"{tuple(labels.shape)}")
        pos = batch.get("position_ids")
        return token_keys(sid, seq_length, pos if pos is not None else row_positions)
    return token_keys(sid, seq_length, row_positions)
