"""The per-token glue of the OTR loss as three small Triton kernels (the Triton backend's `combine`).

What `core/torch_combine.py` does in ~100 tensor ops, here in one launch per step, so that a call's
host cost does not depend on the estimator (issue 14: ~4-8 us of host time per op decide the 70B
TP=8 case, where the logits kernels of a call take ~0.3-0.6 ms):

- `prologue`: label columns, the fingerprint (SplitMix64 hashes of labels and keys with their
  index, out-of-range labels) and, for a device-tensor step, the call's random key; one program per
  block of tokens, the sums by integer atomics (wrap-around adds commute: deterministic);
- `normalise` (sample only): ok, tempered total, per-rank cumulative masses, this rank's scale;
- `finish`: the normalisers again from the gathered statistics (tp x C numbers per token: cheaper to
  recompute than to store), then the estimator's loss and gradient coefficients.

The float64 formulas are those of `core/torch_combine.py` in the same order (its tests compare them).
CPU: under ``TRITON_INTERPRET=1`` (read when this module is imported) the kernels run in Triton's
interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otr_megatron.core.contract import (
    FP_BAD,
    FP_FIELDS,
    FP_KEY_SALT,
    FP_LABEL_SALT,
    STAT_LABEL,
    STAT_MAX,
    STAT_SUMEXP,
    STAT_TMASS,
    STAT_TMEAN,
    Finished,
    Normalisers,
    Prologue,
    Spec,
)
from otr_megatron.core.random import splitmix64_int, stream_key

# the kernels address these columns by position
assert (STAT_MAX, STAT_SUMEXP, STAT_LABEL, STAT_TMASS, STAT_TMEAN) == (0, 1, 2, 3, 4)
assert FP_BAD == 7 and FP_FIELDS == 11

_ROWS = 1024  # tokens per program
_ESTIMATORS = {"sample": 0, "expected": 1, "sft": 2, "dft": 3}


@triton.jit
def _mix64(x):
    """SplitMix64 finaliser of (x + golden) on uint64, as core/random.py's splitmix64."""
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit(do_not_specialize=["n", "lo", "n_real", "vocab", "ignore_index", "shard", "settings", "step",
                               "seed_mix"])
def _prologue_kernel(LABELS, KEYS, VALID, OWNS, LCOL, PRINTS, KEYMIX, STEP, n, lo, n_real, vocab, ignore_index,
                     shard, settings, step, seed_mix, LABEL_SALT: tl.constexpr, KEY_SALT: tl.constexpr,
                     BLOCK: tl.constexpr, FP: tl.constexpr, STEP_PTR: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    y = tl.load(LABELS + offs, mask=inb, other=0)
    valid = inb & (y != ignore_index)
    local = y - lo
    owns = valid & (local >= 0) & (local < n_real)
    tl.store(VALID + offs, valid, mask=inb)
    tl.store(OWNS + offs, owns, mask=inb)
    tl.store(LCOL + offs, tl.where(owns, local, 0), mask=inb)
    if STEP_PTR:
        st = tl.load(STEP)
    else:
        st = tl.zeros([], dtype=tl.int64) + step
    if pid == 0:
        if STEP_PTR:  # the call's key, stream_key(seed, step), for the sampler
            mix = (tl.zeros([], dtype=tl.int64) + seed_mix).to(tl.uint64, bitcast=True)
            tl.store(KEYMIX, _mix64(mix ^ st.to(tl.uint64, bitcast=True)).to(tl.int64, bitcast=True))
    if FP:
        idx = offs.to(tl.uint64, bitcast=True)
        keys = tl.load(KEYS + offs, mask=inb, other=0)
        hl = _mix64(y.to(tl.uint64, bitcast=True) ^ _mix64(idx + LABEL_SALT))
        hk = _mix64(keys.to(tl.uint64, bitcast=True) ^ _mix64(idx + KEY_SALT))
        zero = tl.zeros([BLOCK], dtype=tl.uint64)
        tl.atomic_add(PRINTS + 5, tl.sum(tl.where(inb, hl, zero), axis=0).to(tl.int64, bitcast=True))
        tl.atomic_add(PRINTS + 6, tl.sum(tl.where(inb, hk, zero), axis=0).to(tl.int64, bitcast=True))
        bad = valid & ((y < 0) | (y >= vocab))
        tl.atomic_add(PRINTS + 7, tl.sum(bad.to(tl.int64), axis=0))
        tl.atomic_max(PRINTS + 8, tl.max(tl.where(bad, n - offs, 0), axis=0))  # N - first bad position
        tl.atomic_max(PRINTS + 9, tl.max(tl.where(bad, y, 0), axis=0))
        tl.atomic_min(PRINTS + 10, tl.min(tl.where(bad, y, 0), axis=0))
        if pid == 0:
            tl.store(PRINTS + 0, tl.zeros([], dtype=tl.int64) + n)
            tl.store(PRINTS + 1, tl.zeros([], dtype=tl.int64) + shard)
            tl.store(PRINTS + 2, tl.zeros([], dtype=tl.int64) + vocab)
            tl.store(PRINTS + 3, tl.zeros([], dtype=tl.int64) + settings)
            tl.store(PRINTS + 4, st)


@triton.jit
def _isfinite(x):
    return (x - x) == 0  # NaN for +-inf and NaN


@triton.jit
def _global(S, stride_r, rows, inb, VALID, TP: tl.constexpr, RANK: tl.constexpr, C: tl.constexpr,
            TEMPERED: tl.constexpr, KAPPA: tl.constexpr):
    """(ok, big, lse, share_pi, total, scale_rank, lse_k) of core/torch_combine.normalise, in its order."""
    srow = S + rows * C
    big = tl.load(srow + STAT_MAX, mask=inb, other=0.0)
    nan = big != big
    for r in tl.static_range(1, TP):
        m_r = tl.load(srow + r * stride_r + STAT_MAX, mask=inb, other=0.0)
        nan = nan | (m_r != m_r)
        big = tl.maximum(big, m_r)
    big = tl.where(nan, float("nan"), big)
    sumexp = tl.zeros_like(big)
    for r in tl.static_range(TP):
        m_r = tl.load(srow + r * stride_r + STAT_MAX, mask=inb, other=0.0)
        sumexp += tl.load(srow + r * stride_r + STAT_SUMEXP, mask=inb, other=0.0) * tl.exp(m_r - big)
    lse = big + tl.log(sumexp)
    valid = tl.load(VALID + rows, mask=inb, other=0) != 0
    ok = valid & _isfinite(lse)
    m_me = tl.load(srow + RANK * stride_r + STAT_MAX, mask=inb, other=0.0)
    share_pi = tl.load(srow + RANK * stride_r + STAT_SUMEXP, mask=inb, other=0.0) * tl.exp(m_me - lse)
    total = tl.zeros_like(big)
    scale_me = tl.zeros_like(big)
    lse_k = tl.zeros_like(big)
    if TEMPERED:
        kappa = tl.full([], KAPPA, tl.float64)
        scale_me = tl.exp((m_me - big) / kappa)
        for r in tl.static_range(TP):
            m_r = tl.load(srow + r * stride_r + STAT_MAX, mask=inb, other=0.0)
            total += tl.load(srow + r * stride_r + STAT_TMASS, mask=inb, other=0.0) * tl.exp((m_r - big) / kappa)
        lse_k = big / kappa + tl.log(total)
        ok = ok & _isfinite(lse_k)
    return ok, big, lse, share_pi, total, scale_me, lse_k, valid


@triton.jit
def _normalise_kernel(S, stride_r, VALID, OK, TOTAL, CUM, SCALE, n, TP: tl.constexpr, RANK: tl.constexpr,
                      C: tl.constexpr, KAPPA: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = rows < n
    ok, big, lse, share_pi, total, scale_me, lse_k, valid = _global(S, stride_r, rows, inb, VALID, TP, RANK, C,
                                                                    True, KAPPA)
    kappa = tl.full([], KAPPA, tl.float64)
    cum = tl.zeros_like(big)
    for r in tl.static_range(TP):  # the same sequential sum as `total` (cumsum in rank order)
        m_r = tl.load(S + rows * C + r * stride_r + STAT_MAX, mask=inb, other=0.0)
        cum += tl.load(S + rows * C + r * stride_r + STAT_TMASS, mask=inb, other=0.0) * tl.exp((m_r - big) / kappa)
        tl.store(CUM + rows * TP + r, cum, mask=inb)
    tl.store(OK + rows, ok, mask=inb)
    tl.store(TOTAL + rows, total, mask=inb)
    tl.store(SCALE + rows, scale_me, mask=inb)


@triton.jit
def _finish_kernel(S, stride_r, VALID, OWNS, LCOL, PARTIAL, LOSS, CPI, CQ, COLS, WTS, LLP, QL, HITS, RMEAN, n,
                   TP: tl.constexpr, RANK: tl.constexpr, C: tl.constexpr, KAPPA: tl.constexpr,
                   BETA: tl.constexpr, K: tl.constexpr, EST: tl.constexpr, HAS_Q: tl.constexpr,
                   STATS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = rows < n
    TEMPERED: tl.constexpr = EST <= 1
    ok, big, lse, share_pi, total, scale_me, lse_k, valid = _global(S, stride_r, rows, inb, VALID, TP, RANK, C,
                                                                    TEMPERED, KAPPA)
    srow = S + rows * C
    label_logit = tl.zeros_like(big)
    for r in tl.static_range(TP):
        label_logit += tl.load(srow + r * stride_r + STAT_LABEL, mask=inb, other=0.0)
    beta = tl.full([], BETA, tl.float64)
    kappa = tl.full([], KAPPA, tl.float64)
    label_logprob = label_logit - lse
    q_label = tl.zeros_like(big)
    share_q = tl.zeros_like(big)
    if TEMPERED:
        q_label = tl.exp(label_logit / kappa - lse_k)
        m_me = tl.load(srow + RANK * stride_r + STAT_MAX, mask=inb, other=0.0)
        share_q = tl.load(srow + RANK * stride_r + STAT_TMASS, mask=inb, other=0.0) * scale_me / total
    coef_q = tl.zeros_like(big)
    coef_label = tl.zeros_like(big)
    reward_k = tl.zeros_like(big)
    hits = tl.zeros_like(big)
    if EST == 0:  # sample: S = sum_j R_j from the all-reduced hits
        k = tl.full([], K, tl.float64)
        hits = tl.load(PARTIAL + rows * 2, mask=inb, other=0.0)
        wsum = tl.load(PARTIAL + rows * 2 + 1, mask=inb, other=0.0)
        reward = hits + beta * (k - hits)
        loss = reward / k * lse - wsum / k
        coef_pi = reward / k
        reward_k = reward / k
    elif EST == 1:  # expected
        mean = tl.zeros_like(big)
        for r in tl.static_range(TP):
            m_r = tl.load(srow + r * stride_r + STAT_MAX, mask=inb, other=0.0)
            mass_r = tl.load(srow + r * stride_r + STAT_TMASS, mask=inb, other=0.0) * tl.exp((m_r - big) / kappa)
            mean += tl.where(mass_r > 0, tl.load(srow + r * stride_r + STAT_TMEAN, mask=inb, other=0.0) * mass_r, 0.0)
        mean = mean / total
        one_m_beta = 1 - beta
        qy_logp = tl.where(q_label > 0, q_label * label_logprob, 0.0)
        loss = -(one_m_beta * qy_logp + beta * (mean - lse))
        coef_pi = one_m_beta * q_label + beta
        coef_q = tl.zeros_like(big) - beta
        coef_label = -one_m_beta * q_label
    elif EST == 2:  # sft
        loss = -label_logprob
        coef_pi = tl.zeros_like(big) + 1.0
        coef_label = tl.zeros_like(big) - 1.0
    else:  # dft: -stopgrad(p_y) * log p_y
        p_label = tl.exp(label_logprob)
        loss = -p_label * label_logprob
        coef_pi = p_label
        coef_label = -p_label
    nan_or_zero = tl.where(valid, float("nan"), 0.0)
    tl.store(LOSS + rows, tl.where(ok, loss, nan_or_zero).to(tl.float32), mask=inb)
    tl.store(CPI + rows, tl.where(ok, coef_pi * share_pi, nan_or_zero).to(tl.float32), mask=inb)
    if HAS_Q:
        tl.store(CQ + rows, tl.where(ok, coef_q * share_q, 0.0).to(tl.float32), mask=inb)
    if EST != 0:  # closed forms: one sparse entry per token, at the label on its owner
        owner = (tl.load(OWNS + rows, mask=inb, other=0) != 0) & ok
        col = tl.load(LCOL + rows, mask=inb, other=0)
        tl.store(COLS + rows, tl.where(owner, col, -1).to(tl.int32), mask=inb)
        tl.store(WTS + rows, tl.where(owner, coef_label, 0.0).to(tl.float32), mask=inb)
    if STATS:
        tl.store(LLP + rows, label_logprob.to(tl.float32), mask=inb)
        if TEMPERED:
            tl.store(QL + rows, q_label.to(tl.float32), mask=inb)
        if EST == 0:
            tl.store(HITS + rows, hits.to(tl.float32), mask=inb)
            tl.store(RMEAN + rows, reward_k.to(tl.float32), mask=inb)


def _block(n: int) -> int:
    return min(_ROWS, triton.next_power_of_2(max(n, 1)))


def prologue(labels, keys, step, spec: Spec, ignore_index: int, vocab_size: int, settings: int,
             fingerprint: bool) -> Prologue:
    """Label columns, the call's random key and (optionally) the fingerprint, in one launch."""
    n, dev = labels.numel(), labels.device
    valid = torch.empty(n, dtype=torch.bool, device=dev)
    owns = torch.empty(n, dtype=torch.bool, device=dev)
    col = torch.empty(n, dtype=torch.int64, device=dev)
    step_ptr = torch.is_tensor(step)
    key_mix = torch.empty((), dtype=torch.int64, device=dev) if step_ptr else stream_key(spec.seed, step)
    prints = torch.zeros(FP_FIELDS, dtype=torch.int64, device=dev) if fingerprint else None
    if n:
        seed_mix = splitmix64_int(spec.seed & ((1 << 64) - 1))
        block = _block(n)
        _prologue_kernel[(triton.cdiv(n, block),)](
            labels, keys, valid, owns, col, prints if fingerprint else col, key_mix if step_ptr else col,
            step if step_ptr else col, n, spec.rank * spec.shard, spec.n_real, vocab_size, ignore_index, spec.shard,
            settings, 0 if step_ptr else step, seed_mix - (1 << 64) if seed_mix >= 1 << 63 else seed_mix,
            LABEL_SALT=FP_LABEL_SALT, KEY_SALT=FP_KEY_SALT, BLOCK=block, FP=fingerprint, STEP_PTR=step_ptr)
    elif step_ptr:
        key_mix.copy_(_stream_key_torch(spec.seed, step))
    return Prologue(valid, owns, col, key_mix, prints)


def _stream_key_torch(seed, step):
    from otr_megatron.core.random import stream_key_tensor

    return stream_key_tensor(seed, step)


def normalise(allstats: torch.Tensor, spec: Spec, valid: torch.Tensor) -> Normalisers:
    """ok, total, rank_cum, rank_scale for the sampler (one launch)."""
    tp, n, c = allstats.shape
    dev = allstats.device
    ok = torch.empty(n, dtype=torch.bool, device=dev)
    total = torch.empty(n, dtype=torch.float64, device=dev)
    cum = torch.empty(n, tp, dtype=torch.float64, device=dev)
    scale = torch.empty(n, dtype=torch.float64, device=dev)
    if n:
        block = _block(n)
        _normalise_kernel[(triton.cdiv(n, block),)](
            allstats, allstats.stride(0), valid, ok, total, cum, scale, n, TP=tp, RANK=spec.rank, C=c,
            KAPPA=float(spec.kappa), BLOCK=block)
    return Normalisers(ok, total=total, rank_cum=cum, rank_scale=scale)


def finish(allstats, spec: Spec, valid, pro: Prologue, norms, partial, want_stats: bool) -> Finished:
    """Loss and gradient coefficients (one launch); non-finite normalisers give NaN, ignored tokens 0."""
    tp, n, c = allstats.shape
    dev = allstats.device
    has_q = spec.estimator == "expected" and spec.beta != 0
    closed = spec.estimator != "sample"
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    coefs = torch.empty(2 if has_q else 1, n, dtype=torch.float32, device=dev)
    coef_pi = coefs[0]
    coef_q = coefs[1] if has_q else None
    cols = torch.empty(n, 1, dtype=torch.int32, device=dev) if closed else None
    weights = torch.empty(n, 1, dtype=torch.float32, device=dev) if closed else None
    out = Finished(loss, coef_pi, coef_q, cols, weights)
    stats = None
    if want_stats:
        stats = torch.empty(4, n, dtype=torch.float32, device=dev)
        out.label_logprob = stats[0]
        if spec.tempered:
            out.label_prob_tempered = stats[1]
        if not closed:
            out.hits, out.reward_mean = stats[2], stats[3]
    if n:
        block = _block(n)
        d = loss  # a pointer for unused arguments
        _finish_kernel[(triton.cdiv(n, block),)](
            allstats, allstats.stride(0), valid, pro.owns_label, pro.label_col, partial if partial is not None else d,
            loss, coef_pi, coef_q if has_q else d, cols if closed else d, weights if closed else d,
            stats[0] if want_stats else d, stats[1] if want_stats else d, stats[2] if want_stats else d,
            stats[3] if want_stats else d, n, TP=tp, RANK=spec.rank, C=c, KAPPA=float(spec.kappa),
            BETA=float(spec.beta), K=spec.k, EST=_ESTIMATORS[spec.estimator], HAS_Q=has_q, STATS=want_stats,
            BLOCK=block)
    return out

