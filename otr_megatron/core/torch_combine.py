"""The per-token glue of the OTR loss in plain PyTorch (the torch backend's `Backend.combine`).

Everything here is O(tp) numbers per token: the label columns and input fingerprint (`prologue`),
the global normalisers from the gathered statistics (`normalise`) and the per-estimator loss and
gradient coefficients (`finish`), as `core/contract.py` specifies. `core/triton_combine.py` computes
the same numbers in three small kernels; this module is their float64 reference and the path for
machines without Triton. No host sync, no data-dependent shape, no host-to-device copy.
"""

from __future__ import annotations

import math

import torch

from otr_megatron.core.contract import (
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
from otr_megatron.core.random import splitmix64, stream_key, stream_key_tensor

_INDEX_HASHES: dict = {}  # (n, device) -> [2, n] SplitMix64(arange(n) + salt) for labels, keys: the same every call


def _index_hashes(n: int, device) -> torch.Tensor:
    key = (n, str(device))
    capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
    h = None if capturing else _INDEX_HASHES.get(key)
    if capturing:  # a graph must own its buffers: a cached tensor may be evicted (freed) after capture
        idx = torch.arange(n, dtype=torch.int64, device=device)
        return splitmix64(torch.stack([idx + FP_LABEL_SALT, idx + FP_KEY_SALT]))
    if h is None:
        if len(_INDEX_HASHES) >= 8:
            _INDEX_HASHES.clear()
        idx = torch.arange(n, dtype=torch.int64, device=device)
        h = _INDEX_HASHES[key] = splitmix64(torch.stack([idx + FP_LABEL_SALT, idx + FP_KEY_SALT]))
    return h


def sequence_hashes(labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[2] int64: sum_i SplitMix64(v_i ^ SplitMix64(i + salt)) (wrapping) of labels and of keys, each
    with its own salt. Every element is mixed with its index, so permutations, shifts and compensating
    changes all alter it (a weighted sum sum((i+1) * v_i) does not: [10, 20] and [12, 19] collide)."""
    both = torch.stack([labels, keys]) ^ _index_hashes(labels.numel(), labels.device)
    return splitmix64(both).sum(-1)


def label_columns(labels: torch.Tensor, spec: Spec, ignore_index: int):
    """(valid, owns_label, label_col): which tokens are supervised, whose label is a real id of this
    shard, and its local column (0 where not owned)."""
    valid = labels != ignore_index
    local = labels - spec.rank * spec.shard
    owns = valid & (local >= 0) & (local < spec.n_real)
    return valid, owns, torch.where(owns, local, 0)


def prologue(labels, keys, step, spec: Spec, ignore_index: int, vocab_size: int, settings: int,
             fingerprint: bool) -> Prologue:
    """Label columns, the call's random key and (optionally) the fingerprint `core/contract.py` lists."""
    valid, owns, col = label_columns(labels, spec, ignore_index)
    key_mix = stream_key_tensor(spec.seed, step) if torch.is_tensor(step) else stream_key(spec.seed, step)
    out = Prologue(valid, owns, col, key_mix)
    if not fingerprint:
        return out
    n, dev = labels.numel(), labels.device
    # one stack of 0-dim results (fills with Python scalars are kernel arguments; torch.tensor(list)
    # on CUDA would be a host-to-device copy)
    consts = [torch.full((), v, dtype=torch.int64, device=dev) for v in (n, spec.shard, vocab_size, settings)]
    step_t = step if torch.is_tensor(step) else torch.full((), step, dtype=torch.int64, device=dev)
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    n_bad = bad.sum()
    if n:
        first = torch.argmax(bad.to(torch.uint8))  # the first maximum: the first bad position (if any)
        bad_values = torch.where(bad, labels, 0)
        high, low = bad_values.amax(), bad_values.amin()
    else:  # no tokens (a shape known on the host): no reduction over an empty tensor
        first = high = low = torch.zeros((), dtype=torch.int64, device=dev)
    prints = torch.cat([torch.stack(consts + [step_t]), sequence_hashes(labels, keys),
                        torch.stack([n_bad, torch.where(n_bad > 0, n - first, 0), high, low])])
    out.prints = prints
    return out


def _finite(t: torch.Tensor) -> torch.Tensor:
    return (t - t) == 0  # NaN for +-inf and NaN (two ops; torch.isfinite dispatches more)


def normalise(allstats: torch.Tensor, spec: Spec, valid: torch.Tensor) -> Normalisers:
    """From the gathered ``[tp, N, C]`` statistics, the same numbers on every rank."""
    cols = allstats.unbind(-1)  # [tp, N] each
    m_r, s_r = cols[STAT_MAX], cols[STAT_SUMEXP]
    big = m_r.amax(0)  # NaN if any rank saw NaN; -inf if no rank has a real, finite-or-inf id
    rel = m_r - big
    lse = big + torch.log((s_r * torch.exp(rel)).sum(0))
    ok = valid & _finite(lse)
    share_pi = s_r[spec.rank] * torch.exp(m_r[spec.rank] - lse)
    out = Normalisers(ok, max=big, lse=lse, label_logit=cols[STAT_LABEL].sum(0), share_pi=share_pi)
    if spec.tempered:
        scale = torch.exp(rel / spec.kappa)  # rank r's tempered unit relative to the global max
        mass_r = cols[STAT_TMASS] * scale  # [tp, N]
        out.rank_cum = mass_r.T.cumsum(-1).contiguous()  # rank order; the total is the last value
        out.total = out.rank_cum[:, -1].contiguous()
        out.rank_scale = scale[spec.rank]
        out.lse_k = big / spec.kappa + torch.log(out.total)
        out.ok = ok & _finite(out.lse_k)
        out.share_q = mass_r[spec.rank] / out.total
        if spec.estimator == "expected":
            mean = torch.where(mass_r > 0, cols[STAT_TMEAN] * mass_r, 0.0).sum(0)
            out.mean_logit = mean / out.total
    return out


global_normalisers = normalise


class Terms:
    """Per-token loss and gradient coefficients (float64), grad = g * (a * pi + b * q + sparse)."""

    def __init__(self, loss, coef_pi, coef_q, coef_label, label_logprob, label_prob_tempered=None,
                 reward_mean=None):
        self.loss, self.coef_pi, self.coef_q, self.coef_label = loss, coef_pi, coef_q, coef_label
        self.label_logprob, self.label_prob_tempered, self.reward_mean = label_logprob, label_prob_tempered, reward_mean


def estimator_terms(spec: Spec, norms: Normalisers, partial: torch.Tensor | None = None) -> Terms:
    """The estimator's loss and coefficients from the global quantities (and the all-reduced sample
    partials for "sample")."""
    beta, k = spec.beta, spec.k
    label_logprob = norms.label_logit - norms.lse
    q_label = torch.exp(norms.label_logit / spec.kappa - norms.lse_k) if spec.tempered else None
    if spec.estimator == "sample":
        hits, wsum = partial[:, 0], partial[:, 1]
        reward = hits + beta * (k - hits)  # S = sum_j R_j
        return Terms(reward / k * norms.lse - wsum / k, reward / k, None, None, label_logprob, q_label, reward / k)
    if spec.estimator == "expected":
        qy_logp = torch.where(q_label > 0, q_label * label_logprob, 0.0)
        loss = -((1 - beta) * qy_logp + beta * (norms.mean_logit - norms.lse))
        coef_q = torch.full_like(loss, -beta) if beta != 0 else None
        return Terms(loss, (1 - beta) * q_label + beta, coef_q, -(1 - beta) * q_label, label_logprob, q_label)
    if spec.estimator == "sft":  # coefficients as Python numbers: broadcast in `finish`
        return Terms(-label_logprob, 1.0, None, -1.0, label_logprob)
    p_label = torch.exp(label_logprob)  # dft: -stopgrad(p_y) * log p_y
    return Terms(-p_label * label_logprob, p_label, None, -p_label, label_logprob)


def finish(allstats, spec: Spec, valid, pro: Prologue, norms: Normalisers | None, partial, want_stats: bool
           ) -> Finished:
    """Loss and gradient coefficients; non-finite normalisers give NaN, ignored tokens exactly 0."""
    if norms is None:
        norms = normalise(allstats, spec, valid)
    ok = norms.ok
    terms = estimator_terms(spec, norms, partial)
    nan_or_zero = torch.where(valid, math.nan, 0.0)
    loss = torch.where(ok, terms.loss, nan_or_zero).float()
    coef_pi = torch.where(ok, norms.share_pi * terms.coef_pi, nan_or_zero).float()
    coef_q = None
    if terms.coef_q is not None:
        coef_q = torch.where(ok, terms.coef_q * norms.share_q, 0.0).float()
    cols = weights = None
    if terms.coef_label is not None:  # closed forms: one sparse entry per token, at the label on its owner
        owner = pro.owns_label & ok
        cols = torch.where(owner, pro.label_col, -1).to(torch.int32)[:, None]
        weights = torch.where(owner, terms.coef_label, 0.0).float()[:, None]
    out = Finished(loss, coef_pi, coef_q, cols, weights)
    if want_stats:
        out.label_logprob = terms.label_logprob.float()
        if terms.label_prob_tempered is not None:
            out.label_prob_tempered = terms.label_prob_tempered.float()
        if partial is not None:
            out.hits = partial[:, 0].float()
            out.reward_mean = terms.reward_mean.float()
    return out
