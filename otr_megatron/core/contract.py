"""The backend contract (v2): the compute steps of the OTR loss, one interface for every backend.

The autograd Function in `core/loss.py` is orchestration only (Megatron's shape): prologue ->
local statistics -> all-gather -> global normalisers -> sampling -> all-reduce -> finish; backward =
the gradient step. It never branches on a backend's name: what differs between backends is a field
of `Backend` below. What touches the ``[rows, V/tp]`` logits lives behind three entry points, which
a backend module provides with exactly these signatures (`core/torch_backend.py` is the reference,
`core/triton_backend.py` the fused kernels); the small per-token glue around them (`combine`) is a
second module (`core/torch_combine.py`, `core/triton_combine.py`).

No entry point (nor combine function) synchronises with the host, allocates a data-dependent shape
or copies Python scalars host-to-device per call: a CUDA graph must be able to capture forward +
backward. `Spec` holds no step, so it is the same for every step of a run; the random key of a call
is passed explicitly as ``key_mix``: a Python int (the signed-int64 value of
`core.random.stream_key(seed, step)`) or a 0-dim int64 tensor on the logits' device holding the same
value (what a call with a device-tensor ``step`` passes). Both backends accept both and draw
identical samples for the two forms.

``local_stats(x, label_col, owns_label, valid, spec, stats_out, prefix_out, scratch)``
    Statistics of a chunk of rows of this rank's shard.
    - ``x``: ``[R, shard]`` logits (bf16/fp16/fp32/fp64), rows contiguous. Only the first
      ``spec.n_real`` columns are real ids; the rest is vocabulary padding and must be ignored.
    - ``label_col``: ``[R]`` int64 local column of the label (0 where not owned);
      ``owns_label``: ``[R]`` bool, the label is a real id of this shard and the row is not ignored;
      ``valid``: ``[R]`` bool, the row is supervised. A backend MAY skip reading rows with valid
      False; their stats row is then MAX=-inf, SUMEXP=0, LABEL=0, TMASS=0, TMEAN=0 and their
      prefix row 0 (rows with valid True: the semantics below, bit for bit).
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

``sample(x, keys, key_mix, label_col, owns_label, ok, total, rank_cum, rank_scale, prefix, spec,
partial_out, cols_out, weights_out, lanes_out=None, scratch=None)``
    Draw K samples per row (docs/sampling.md section 4) for a chunk of rows.
    - ``keys``: ``[R]`` int64 token keys; ``key_mix``: int or 0-dim int64 tensor (above); the
      uniforms are `core.random.token_uniforms_from_key(keys, K, key_mix)`.
    - ``ok``: ``[R]`` bool, row is supervised and its normalisers are finite (others draw nothing).
    - ``total``: ``[R]`` float64 global tempered mass in units of exp(M / kappa), M = global max;
      ``rank_cum``: ``[R, tp]`` float64 inclusive prefix sums of the per-rank masses (rank order,
      ``rank_cum[:, -1] == total``); ``rank_scale``: ``[R]`` float64 exp((m_r - M) / kappa) of this
      rank (mass_r = TMASS_r * rank_scale).
    - ``prefix``: ``[R, n_blocks]`` float64 from `local_stats`.
    - writes ``partial_out``: ``[R, 2]`` float64: hits (samples equal to the label, owner only) and
      sum_j R_j * x[a_j] over this rank's samples (R_j = 1 on a hit, else beta);
      ``cols_out``: ``[R, K]`` **int32** sparse gradient entries: the local column of a sample this
      rank owns, -1 = none. Duplicates MAY be merged (the Triton backend merges them: in a row each
      owned column appears once, at the lowest lane that drew it, with the merged lanes' weights
      summed; the other lanes hold -1 / 0.0); the torch backend may leave them (its grad accumulates);
      ``weights_out``: ``[R, K]`` float32 -R_j / K where owned (summed where merged), else 0;
      rows with ``ok`` False: cols -1, weights 0, partial 0.
    - ``lanes_out``: None, or ``[R, K]`` int32: the local column lane j drew where this rank owns it,
      else -1, in lane order, duplicates kept (`return_stats["owned_samples"]`). Written only when
      not None (the loss passes it only for ``return_stats=True``).

``grad(x, out, g, coef_pi, coef_q, cols, weights, valid, spec, scratch, local=None)``
    Gradient of a chunk of rows, written to ``out`` (``[R, shard]``, the input dtype; may be ``x``
    itself for the in-place backward).
    - ``g``: ``[R]`` fp32 upstream gradient; ``coef_pi``: ``[R]`` fp32 coefficient of the rank-local
      softmax(x) (already times this rank's global share); ``coef_q``: ``[R]`` fp32 coefficient of the
      rank-local softmax(x / kappa), or None; ``cols``/``weights``: ``[R, S]`` int32/fp32 sparse
      entries (S = K for "sample", 1 for the label elsewhere; col -1 = none, weight 0 there). The
      Triton grad may assume no duplicate column >= 0 within a row (its sampler merged them; the
      closed forms have S = 1); the torch grad accumulates duplicates. ``valid``: ``[R]`` bool.
    - ``local``: passed only when `Backend.grad_reads_local`: the forward's own ``[R, C]`` float64
      `local_stats` rows of this rank (the grad then needs no first pass for the local normalisers).
    - ``out[:, :n_real] = g * (coef_pi * softmax(x) + coef_q * softmax(x * inv_kappa))`` plus the
      scatter-add of ``g * weights`` at ``cols``, computed in fp32 and rounded once to the output
      dtype; rows with ``valid == False`` are exactly 0 (even for NaN logits) and their logits row is
      not read; padded columns ``[n_real, shard)`` are exactly 0.

``scratch(rows, cols, device)`` returns an opaque per-pass workspace (or None) passed to every call
of one forward or backward, then dropped.

The combine module (`Backend.combine`) holds the per-token glue, O(tp) numbers per token:

``prologue(labels, keys, step, spec, ignore_index, vocab_size, settings, fingerprint) -> Prologue``
    ``labels``/``keys``: ``[N]`` int64; ``step``: int or 0-dim int64 tensor; ``settings``: int id of
    the host-side settings that must agree across ranks. Returns the label columns (`Prologue`
    below), ``key_mix`` (int for an int step, else a 0-dim int64 tensor) and, if ``fingerprint``,
    ``prints``: int64 ``[FP_FIELDS]`` (columns `FP_*`): number of tokens, shard, vocab size,
    settings, step, SplitMix64 hashes of labels and keys (each element mixed with its index,
    wrapping int64 sum), and the out-of-range labels: count, N - first flat position (0 if none),
    largest (>= vocab_size, else 0) and smallest (< 0, else 0). The same numbers on every backend.
``normalise(allstats, spec, valid) -> Normalisers`` (sample only, before sampling): from the
    gathered ``[tp, N, C]`` statistics at least ``ok``, ``total``, ``rank_cum``, ``rank_scale``.
``finish(allstats, spec, valid, prologue, norms, partial, want_stats) -> Finished``
    The per-estimator loss and gradient coefficients (`Finished` below); ``norms`` is what
    ``normalise`` returned (None for the closed forms), ``partial`` the all-reduced sample partials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


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
    """Static settings of a call, shared by every chunk, every backend and every step of a run (the
    step enters through ``key_mix`` only)."""

    estimator: str
    kappa: float  # temperature
    beta: float  # reward of a sampled non-label token
    k: int  # samples per token
    seed: int
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


# columns of the fingerprint each rank all-gathers (`prologue`); the first FP_COMPARED must agree
FP_TOKENS, FP_SHARD, FP_VOCAB, FP_SETTINGS, FP_STEP, FP_LABELS, FP_KEYS = range(7)
FP_BAD, FP_BAD_FIRST, FP_BAD_MAX, FP_BAD_MIN = range(7, 11)
FP_FIELDS = 11
FP_COMPARED = 7
FP_LABEL_SALT, FP_KEY_SALT = 0x4C41424C, 0x4B455953  # "LABL", "KEYS": labels and keys hash differently


@dataclass
class Prologue:
    """`prologue`'s result: which tokens are supervised, whose label is a real id of this shard and
    its local column, the call's random key and (if asked) the fingerprint."""

    valid: torch.Tensor  # [N] bool
    owns_label: torch.Tensor  # [N] bool
    label_col: torch.Tensor  # [N] int64 (0 where not owned)
    key_mix: Any  # int, or 0-dim int64 tensor
    prints: torch.Tensor | None = None  # [FP_FIELDS] int64


@dataclass
class Normalisers:
    """Per-token global quantities, identical on every rank (float64 [N] unless noted). `normalise`
    must provide the four the sampler reads (ok, total, rank_cum, rank_scale); the rest is optional
    (the torch combine fills everything, `finish` may recompute from the gathered statistics)."""

    ok: torch.Tensor  # bool: supervised and finite normalisers
    total: torch.Tensor | None = None  # tempered mass in units of exp(M / kappa)
    rank_cum: torch.Tensor | None = None  # [N, tp] inclusive prefix sums of the per-rank masses
    rank_scale: torch.Tensor | None = None  # this rank's exp((m_r - M) / kappa)
    max: torch.Tensor | None = None  # M, global max logit
    lse: torch.Tensor | None = None  # logsumexp(x)
    label_logit: torch.Tensor | None = None
    share_pi: torch.Tensor | None = None  # this rank's share of softmax(x): sumexp_r * exp(m_r - lse)
    lse_k: torch.Tensor | None = None  # logsumexp(x / kappa)
    share_q: torch.Tensor | None = None  # this rank's share of softmax(x / kappa)
    mean_logit: torch.Tensor | None = None  # sum_a q(a) x(a) (expected estimator)


@dataclass
class Finished:
    """`finish`'s result: what the forward returns and the backward reads, grad = g * (coef_pi * pi +
    coef_q * q + sparse). Ignored rows: loss and coefficients 0; supervised rows with non-finite
    normalisers: loss and coef_pi NaN, coef_q and weights 0."""

    loss: torch.Tensor  # float32 [N]
    coef_pi: torch.Tensor  # float32 [N], times this rank's share
    coef_q: torch.Tensor | None  # float32 [N] or None
    cols: torch.Tensor | None  # closed forms: int32 [N, 1] label column on its owner, else -1 (sample: None)
    weights: torch.Tensor | None  # closed forms: float32 [N, 1]
    label_logprob: torch.Tensor | None = None  # want_stats only: float32 [N]
    label_prob_tempered: torch.Tensor | None = None  # float32 [N] (tempered estimators)
    hits: torch.Tensor | None = None  # float32 [N] (sample)
    reward_mean: torch.Tensor | None = None  # float32 [N] (sample)


@dataclass(frozen=True)
class Backend:
    """One implementation of the steps: the entry points above, and what the loss must know about
    them (so `core/loss.py` never branches on `name`)."""

    name: str
    local_stats: Callable
    sample: Callable
    grad: Callable
    scratch: Callable
    combine: Any  # module with prologue, normalise, finish
    grad_reads_local: bool = False  # grad takes ``local=`` (the forward's own statistics rows)
    one_pass: bool = False  # no workspace: the default chunk is every row (one launch per step)
