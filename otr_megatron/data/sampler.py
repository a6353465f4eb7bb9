"""Deterministic global batches and their Megatron-style split into per-DP-rank micro-batches.

The training stream is an endless sequence of rows: epoch ``e`` is a permutation of all rows drawn
from ``numpy.random.default_rng([seed, e])``. Global batch ``i`` is stream positions
``[i*G, (i+1)*G)``, so the only data position a checkpoint needs is ``consumed_samples`` (as in
Megatron), and a resume replays exactly the same batches.

Megatron's split (``MegatronPretrainingSampler``): a global batch of ``G = M * dp * mbs`` rows is
consumed as ``M`` consecutive chunks of ``dp * mbs`` rows; in each chunk DP rank ``r`` takes rows
``[r*mbs, (r+1)*mbs)``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def num_microbatches(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """global = num_microbatches x dp x micro; raise naming the three values if it does not divide."""
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size), ("dp", dp_size)):
        if v < 1:
            raise ValueError(f"{name}={v}; expected a positive integer")
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size x dp = "
            f"{micro_batch_size} x {dp_size} = {per_step}"
        )
    return global_batch_size // per_step


def split_global_batch(rows, micro_batch_size: int, dp_size: int, dp_rank: int) -> list[list[int]]:
    """DP rank ``dp_rank``'s micro-batches (lists of row indices) of one global batch."""
    rows = list(rows)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}; expected 0 <= dp_rank < dp={dp_size}")
    m = num_microbatches(len(rows), micro_batch_size, dp_size)
    chunk = micro_batch_size * dp_size
    return [
        rows[k * chunk + dp_rank * micro_batch_size : k * chunk + (dp_rank + 1) * micro_batch_size] for k in range(m)
    ]


class GlobalBatchSampler:
    """Rows of the endless shuffled stream; `global_batch(consumed)` is the next global batch."""

    def __init__(self, num_rows: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_rows < 1:
            raise ValueError("the training split has no rows; check data.train")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        p = self._perm_cache.get(epoch)
        if p is None:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            p = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_cache[epoch] = p
        return p

    def rows(self, start: int, count: int) -> list[int]:
        """Rows at stream positions ``[start, start+count)`` (crossing epochs as needed)."""
        out = []
        for k in range(start, start + count):
            e, pos = divmod(k, self.num_rows)
            out.append(int(self._perm(e)[pos]))
        return out

    def global_batch(self, consumed_samples: int) -> list[int]:
        return self.rows(consumed_samples, self.global_batch_size)

    def epoch(self, consumed_samples: int) -> float:
        return consumed_samples / self.num_rows


def eval_microbatches(num_rows: int, micro_batch_size: int, dp_size: int, dp_rank: int) -> list[list[int]]:
    """Every row of an evaluation split exactly once, in order, as this DP rank's micro-batches.
    The tail is filled with -1 (all-padding rows, no supervised tokens) so all ranks run the same
    number of micro-batches."""
    chunk = micro_batch_size * dp_size
    total = -(-num_rows // chunk) * chunk
    rows = list(range(num_rows)) + [-1] * (total - num_rows)
    return split_global_batch(rows, micro_batch_size, dp_size, dp_rank)


def microbatch_iterator(dataset, micro_batches: list[list[int]]) -> Iterator[dict]:
    """Collated batches, one per micro-batch, in order (what Megatron schedules pull from)."""
    for mb in micro_batches:
        yield dataset.collate(mb)
