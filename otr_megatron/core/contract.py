"""The backend contract: the three compute steps of the OTR loss, one interface for every backend.

The autograd Function in `core/loss.py` is orchestration only (Megatron's shape): local statistics ->
all-gather -> global normalisers -> per-estimator coefficients -> sampling -> loss; backward = the
gradient step. What touches the ``[rows, V/tp]`` logits lives behind three entry points, which a
backend module provides with exactly these signatures (see `core/torch_backend.py`, the reference):

``local_stats(x, label_col, owns_label, spec, stats_out, prefix_out, scratch)``
    Statistics of a chunk of rows of this rank's shard.
    - ``x``: ``[R, shard]`` logits (bf16/fp16/fp32/fp64), rows contiguous. Only the first
      ``spec.n_real`` columns are real ids; the rest is vocabulary padding and must be ignored.
    - ``label_col``: ``[R]`` int64 local column of the label (0 where not owned);
      ``owns_label``: ``[R]`` bool, the label is a real id of this shard and the row is not ignored.
    - writes ``stats_out``: ``[R, spec.stat_columns]`` float64 (columns `STAT_*` below):
      ``MAX`` = m_r, max over real ids (-inf if none, NaN if a logit is NaN); ``SUMEXP`` =
      sum exp(x - m_r) (0 if m_r = -inf); ``LABEL`` = x[label_col] where owned, else 0;
      ``TMASS`` (sample/expected) = the rank's tempered mass in units of exp(m_r / kappa);
      for "sample" it is exactly ``prefix_out[:, -1]`` (0 without blocks); ``TMEAN`` (expected)
      = sum_a q_r(a) x(a) with q_r the rank-local softmax(x / kappa) (0 * -inf counts as 0).
    - writes ``prefix_out`` (sample only, else None): ``[R, n_blocks]`` float64 prefix sums C_b
      (sequential) of the block weights w_b = exp((bmax_b - m_r) / kappa) * bsum_b (float64) over
      blocks of ``spec.block`` real ids (docs/sampling.md sections 1-3). bmax_b is the fp32 max
      of the block's real ids; bsum_b = the fp32 pairwise-tree sum (B -> B/2 -> ... -> 1, element
      i + width added to element i) of exp((x_i - bmax_b) * inv_kappa32), inv_kappa32 =
      float32(1 / kappa), padded ids 0; a block with bmax_b = -inf uses 0 in place of bmax_b.
      Each block's (bmax_b, bsum_b) depends on that block's values only (never on the chunk, the
      shard or the row), so every TP layout draws the same samples.

``sample(x, keys, label_col, owns_label, ok, total, rank_cum, rank_scale, prefix, spec, partial_out,
cols_out, weights_out, scratch)``
    Draw K samples per row (docs/sampling.md section 4) for a chunk of rows.
    - ``keys``: ``[R]`` int64 token keys; uniforms = `token_uniforms(keys, K, seed, step)`.
    - ``ok``: ``[R]`` bool, row is supervised and its normalisers are finite (others draw nothing).
    - ``total``: ``[R]`` float64 global tempered mass in units of exp(M / kappa), M = global max;
      ``rank_cum``: ``[R, tp]`` float64 inclusive prefix sums of the per-rank masses (rank order,
      ``rank_cum[:, -1] == total``); ``rank_scale``: ``[R]`` float64 exp((m_r - M) / kappa) of this
      rank (mass_r = TMASS_r * rank_scale).
    - ``prefix``: ``[R, n_blocks]`` float64 from `local_stats`.
    - writes ``partial_out``: ``[R, 2]`` float64: hits (samples equal to the label, owner only) and
      sum_j R_j * x[a_j] over this rank's samples (R_j = 1 on a hit, else beta);
      ``cols_out``: ``[R, K]`` int64 local column of sample j where this rank owns it, else -1;
      ``weights_out``: ``[R, K]`` float32 -R_j / K where owned, else 0.

``grad(x, out, g, coef_pi, coef_q, cols, weights, valid, spec, scratch)``
    Gradient of a chunk of rows, written to ``out`` (``[R, shard]``, the input dtype; may be ``x``
    itself for the in-place backward).
    - ``g``: ``[R]`` fp32 upstream gradient; ``coef_pi``: ``[R]`` fp32 coefficient of the rank-local
      softmax(x) (already times this rank's global share); ``coef_q``: ``[R]`` fp32 coefficient of the
      rank-local softmax(x / kappa), or None; ``cols``/``weights``: ``[R, S]`` int64/fp32 sparse
      entries (S = K for "sample", 1 for the label elsewhere; col -1 = none, weight 0 there);
      ``valid``: ``[R]`` bool.
    - ``out[:, :n_real] = g * (coef_pi * softmax(x) + coef_q * softmax(x * inv_kappa))`` plus the
      scatter-add of ``g * weights`` at ``cols`` (duplicates accumulate), computed in fp32 and rounded
      once to the output dtype; rows with ``valid == False`` are exactly 0 (even for NaN logits);
      padded columns ``[n_real, shard)`` are exactly 0.

``scratch(rows, cols, device)`` returns an opaque per-pass workspace (or None) passed to every call
of one forward or backward, then dropped. No entry point may synchronise with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable



# columns of the per-rank statistics that are all-gathered
STAT_MAX, STAT_SUMEXP, STAT_LABEL, STAT_TMASS, STAT_TMEAN = range(5)


def stat_columns(estimator: str) -> int:
    """Numbers per token each rank sends: 3 (sft/dft), 4 (sample), 5 (expected)."""
    return {"sft": 3, "dft": 3, "sample": 4, "expected": 5}[estimator]


def base_block_size(vocab_size: int, k: int) -> int:
    """B0 = clamp(2**round(0.5 * log2(V / K)), 4, 64): balances the per-token block scan (V / B)
    against the K in-block scans (K * B). A function of the real vocabulary and K only."""
    return int(min(64, max(4, 2 ** round(0.5 * math.log2(max(vocab_size / k, 1.0))))))


def block_size(vocab_size: int, k: int, shard: int) -> int:
    """Largest power of two <= B0 dividing the shard; equals B0 (layout-exact) when shard % B0 == 0,
    as with Megatron's padding to a multiple of 128 x tp."""
    b = base_block_size(vocab_size, k)
    while shard % b:
        b //= 2
    return b


@dataclass(frozen=True)
class Spec:
    """Static settings of one call, shared by every chunk and every backend."""

    estimator: str
    kappa: float  # temperature
    beta: float  # reward of a sampled non-label token
    k: int  # samples per token
    seed: int
    step: int
    rank: int
    world: int
    shard: int  # columns of this rank's logits
    n_real: int  # real (unpadded) ids among them
    block: int  # ids per sampling block (1 unless estimator == "sample")

    @property
    def stat_columns(self) -> int:
        return stat_columns(self.estimator)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_real // self.block) if self.estimator == "sample" else 0

    @property
    def tempered(self) -> bool:
        return self.estimator in ("sample", "expected")


@dataclass(frozen=True)
class Backend:
    """One implementation of the three steps (module functions with the signatures above)."""

    name: str
    local_stats: Callable
    sample: Callable
    grad: Callable
    scratch: Callable
