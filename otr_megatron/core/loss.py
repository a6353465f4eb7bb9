"""One-Token Rollout over vocab-parallel logits, with no vocabulary-sized communication.

Each tensor-parallel rank holds logits ``[N, V/tp]`` for global ids ``[rank*V/tp, (rank+1)*V/tp)``.
The forward is a sequence of named steps (Megatron's shape); what touches the logits is a backend's
(`core/contract.py`: torch reference, Triton kernels), the collectives are all visible here:

1. `local_statistics`: per rank and token, max, sum exp at temperature 1, the label's logit (owner
   only), the tempered mass at kappa (and, for the expected estimator, the tempered mean logit;
   for the sampled one, the float64 prefix sums of the block weights of docs/sampling.md);
2. one all-gather of those statistics (3-5 numbers per token), after one small all-gather of input
   fingerprints, so a mismatched rank raises instead of silently training on wrong numbers;
3. `global_normalisers`: logsumexp at 1 and kappa, per-rank masses, this rank's shares;
4. `draw_samples` (sample only): the layout-exact hierarchical inverse CDF, then one all-reduce of
   hit counts and reward-weighted sampled logits (2 numbers per token);
5. `estimator_terms`: per-token loss and the gradient coefficients of each estimator.

The backward is one step per chunk (`grad`): dense ``a * softmax(x) [+ b * softmax(x / kappa)]`` plus
the sparse sampled (or label) entries, from the saved per-token coefficients, with no collective.
Only O(tp) numbers per token cross ranks, whatever K is, and a call synchronises with the host at
most twice (the fingerprint check, and compacting the drawn samples when ``return_stats=True``).
"""

from __future__ import annotations

import inspect
import math
import struct
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from otr_megatron.core.contract import (
    STAT_LABEL,
    STAT_MAX,
    STAT_SUMEXP,
    STAT_TMASS,
    STAT_TMEAN,
    Backend,
    Spec,
    block_size,
)
from otr_megatron.core.backends import get_backend
from otr_megatron.core.config import OTRConfig
from otr_megatron.core.random import splitmix64, stream_key

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)


def _default_chunk_tokens(shard: int, on_gpu: bool) -> int:
    # Elements per fp32 temporary: ~1M (4 MB) keeps a chunk cache-resident on CPU (fastest in the
    # benchmark sweep); GPUs want fewer, larger launches (~16M elements, 64 MB).
    target = 1 << 24 if on_gpu else 1 << 20
    return max(1, target // max(shard, 1))


def _tp_layout(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _settings_id(cfg: OTRConfig, step: int, ignore_index: int) -> int:
    """Deterministic id of everything that must agree across TP ranks (Python's hash() is salted)."""
    raw = struct.pack("<qdd", cfg.num_samples, cfg.temperature, cfg.neg_reward)
    raw += f"{cfg.estimator}|{cfg.seed}|{step}|{ignore_index}".encode()
    return zlib.crc32(raw)


# --------------------------------------------------------------------------------------------
# input checks: one tiny collective and one host sync, so a mistake fails loudly on every rank
# --------------------------------------------------------------------------------------------


def _check_args(logits, labels, cfg, token_keys, vocab_size, padded_vocab_size, step, world):
    if not isinstance(cfg, OTRConfig):
        raise TypeError(f"cfg must be an otr_megatron.OTRConfig, got {type(cfg).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOAT_DTYPES:
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a bf16, fp16, fp32 or fp64 tensor, got {got}")
    if logits.dim() < 1 or logits.size(-1) < 1:
        raise ValueError(f"logits must have shape [..., V/tp] with V/tp >= 1, got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 (or int32) tensor of token ids, got {got}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without its last dimension "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if token_keys is not None:
        if not isinstance(token_keys, torch.Tensor) or token_keys.dtype not in _INT_DTYPES:
            got = token_keys.dtype if isinstance(token_keys, torch.Tensor) else type(token_keys).__name__
            raise TypeError(f"token_keys must be an int64 tensor like labels, got {got}")
        if tuple(token_keys.shape) != tuple(labels.shape):
            raise ValueError(f"token_keys shape {tuple(token_keys.shape)} must equal labels shape {tuple(labels.shape)}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0 (the training iteration), got {step!r}")
    shard = logits.size(-1)
    if padded_vocab_size is not None and shard * world != padded_vocab_size:
        raise ValueError(
            f"logits last dimension {shard} x tensor-parallel size {world} = {shard * world} does not match "
            f"padded_vocab_size={padded_vocab_size}; pass this rank's vocabulary shard, not gathered logits"
        )
    if vocab_size is None:
        vocab_size = shard * world
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= shard * world:
        raise ValueError(
            f"vocab_size must be an integer in [1, logits.size(-1) * tp = {shard * world}], got {vocab_size!r}"
        )
    return vocab_size


def _out_of_range(labels, vocab_size, ignore_index) -> torch.Tensor:
    return ((labels < 0) & (labels != ignore_index)) | (labels >= vocab_size)


_LABEL_SALT, _KEY_SALT = 0x4C41424C, 0x4B455953  # "LABL", "KEYS": labels and keys hash differently


def _sequence_hash(values: torch.Tensor, salt: int) -> torch.Tensor:
    """sum_i SplitMix64(v_i ^ SplitMix64(i + salt)) in wrapping int64: every element is mixed with
    its index, so permutations, shifts and compensating changes all alter it (a weighted sum
    sum((i+1) * v_i) does not: [10, 20] and [12, 19] collide)."""
    idx = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
    return splitmix64(values.reshape(-1).to(torch.int64) ^ splitmix64(idx + salt)).sum()


def _fingerprint(labels, keys, vocab_size, ignore_index, cfg, step, shard) -> torch.Tensor:
    n = labels.numel()
    bad = _out_of_range(labels, vocab_size, ignore_index)
    out = torch.empty(7, dtype=torch.int64, device=labels.device)
    # filled on the device: torch.tensor(list) or out[i] = int on CUDA is a blocking host-to-device copy
    for i, value in enumerate([n, shard, vocab_size, _settings_id(cfg, step, ignore_index)]):
        out[i].fill_(value)
    out[4] = _sequence_hash(labels, _LABEL_SALT)
    out[5] = _sequence_hash(keys, _KEY_SALT)
    out[6] = bad.sum()
    return out


_FINGERPRINT_FIELDS = ["number of tokens", "logits last dimension", "vocab_size",
                       "OTR settings / step / ignore_index", "labels", "token_keys"]


def _verify_fingerprints(prints: torch.Tensor, labels, vocab_size, ignore_index) -> None:
    """Raises on every rank if any field differs across ranks. The one host sync of a call."""
    rows = prints.tolist()
    for field, name in enumerate(_FINGERPRINT_FIELDS):
        values = [r[field] for r in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"tensor-parallel ranks disagree on {name} (per rank: {values}); every TP rank must call "
                "vocab_parallel_otr_loss with the same labels, token keys and settings and equally shaped logits"
            )
    if rows[0][6]:
        example = labels[_out_of_range(labels, vocab_size, ignore_index)].flatten()[:5].tolist()
        raise ValueError(
            f"labels must be token ids in [0, vocab_size={vocab_size}) or ignore_index={ignore_index}; "
            f"found {rows[0][6]} outside, e.g. {example}"
        )


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    if group is None:
        return t.unsqueeze(0)
    out = torch.empty((world * t.size(0),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out.view((world,) + tuple(t.shape))


# --------------------------------------------------------------------------------------------
# the forward's steps (each usable on its own: tests run them for simulated ranks)
# --------------------------------------------------------------------------------------------


def make_spec(cfg: OTRConfig, step: int, rank: int, world: int, shard: int, vocab_size: int) -> Spec:
    """Static settings of one call on one rank."""
    n_real = min(max(vocab_size - rank * shard, 0), shard)  # real (unpadded) ids held here
    block = block_size(vocab_size, cfg.num_samples, shard) if cfg.estimator == "sample" else 1
    return Spec(cfg.estimator, float(cfg.temperature), float(cfg.neg_reward), cfg.num_samples, cfg.seed, step,
                rank, world, shard, n_real, block)


def label_columns(labels: torch.Tensor, spec: Spec, ignore_index: int):
    """(valid, owns_label, label_col): which tokens are supervised, whose label is a real id of this
    shard, and its local column (0 where not owned)."""
    valid = labels != ignore_index
    local = labels - spec.rank * spec.shard
    owns = valid & (local >= 0) & (local < spec.n_real)
    return valid, owns, torch.where(owns, local, torch.zeros_like(local))


def _v2(backend: Backend) -> bool:
    """Interim (torch-path branch): does this backend take contract v2's arguments (valid, key_mix)?"""
    return "valid" in inspect.signature(backend.local_stats).parameters


def local_statistics(backend: Backend, spec: Spec, logits, label_col, owns_label, chunk: int, valid=None):
    """Step 1: this rank's statistics, chunk by chunk. Returns (stats [N, C] float64, prefix
    [N, n_blocks] float64 or None), see `core/contract.py`."""
    n_tok = logits.size(0)
    stats = torch.empty(n_tok, spec.stat_columns, dtype=torch.float64, device=logits.device)
    prefix = (torch.empty(n_tok, spec.n_blocks, dtype=torch.float64, device=logits.device)
              if spec.estimator == "sample" else None)
    scratch = backend.scratch(min(chunk, n_tok), spec.n_real, logits.device)
    for lo in range(0, n_tok, chunk):
        hi = min(n_tok, lo + chunk)
        extra = (torch.ones_like(owns_label[lo:hi]) if valid is None else valid[lo:hi],) if _v2(backend) else ()
        backend.local_stats(logits[lo:hi], label_col[lo:hi], owns_label[lo:hi], *extra, spec, stats[lo:hi],
                            prefix[lo:hi] if prefix is not None else None, scratch)
    return stats, prefix


@dataclass
class Normalisers:
    """Step 3's per-token results, identical on every rank (float64 [N] unless noted)."""

    max: torch.Tensor  # M, global max logit
    lse: torch.Tensor  # logsumexp(x)
    label_logit: torch.Tensor
    ok: torch.Tensor  # bool: supervised and finite normalisers
    share_pi: torch.Tensor  # this rank's share of softmax(x): sumexp_r * exp(m_r - lse)
    lse_k: torch.Tensor | None = None  # logsumexp(x / kappa)
    total: torch.Tensor | None = None  # tempered mass in units of exp(M / kappa)
    rank_cum: torch.Tensor | None = None  # [N, tp] inclusive prefix sums of the per-rank masses
    rank_scale: torch.Tensor | None = None  # this rank's exp((m_r - M) / kappa)
    share_q: torch.Tensor | None = None  # this rank's share of softmax(x / kappa)
    mean_logit: torch.Tensor | None = None  # sum_a q(a) x(a) (expected estimator)


def global_normalisers(allstats: torch.Tensor, spec: Spec, valid: torch.Tensor) -> Normalisers:
    """Step 3: from the gathered ``[tp, N, C]`` statistics, the same numbers on every rank."""
    m_r = allstats[..., STAT_MAX]
    big = m_r.amax(0)  # NaN if any rank saw NaN; -inf if no rank has a real, finite-or-inf id
    lse = big + torch.log((allstats[..., STAT_SUMEXP] * torch.exp(m_r - big)).sum(0))
    ok = valid & torch.isfinite(lse)
    share_pi = allstats[spec.rank, :, STAT_SUMEXP] * torch.exp(m_r[spec.rank] - lse)
    out = Normalisers(big, lse, allstats[..., STAT_LABEL].sum(0), ok, share_pi)
    if spec.tempered:
        scale = torch.exp((m_r - big) / spec.kappa)  # rank r's tempered unit relative to the global max
        mass_r = allstats[..., STAT_TMASS] * scale  # [tp, N]
        out.rank_cum = mass_r.T.cumsum(-1).contiguous()  # rank order; the total is the last value
        out.total = out.rank_cum[:, -1]
        out.rank_scale = scale[spec.rank]
        out.lse_k = big / spec.kappa + torch.log(out.total)
        out.ok = ok & torch.isfinite(out.lse_k)
        out.share_q = mass_r[spec.rank] / out.total
        if spec.estimator == "expected":
            mean = torch.where(mass_r > 0, allstats[..., STAT_TMEAN] * mass_r, 0.0).sum(0)
            out.mean_logit = mean / out.total
    return out


def draw_samples(backend: Backend, spec: Spec, logits, keys, label_col, owns_label, norms: Normalisers, prefix):
    """Step 4 (no collective): this rank's part of the K samples per token. Returns (partial [N, 2]
    float64 hits and sum_j R_j x[a_j] over this rank's samples, cols [N, K] int64 (-1 = not this
    rank's), weights [N, K] float32 = -R_j / K)."""
    n_tok = logits.size(0)
    dev = logits.device
    partial = torch.empty(n_tok, 2, dtype=torch.float64, device=dev)
    v2 = _v2(backend)
    cols = torch.empty(n_tok, spec.k, dtype=torch.int32 if v2 else torch.int64, device=dev)
    weights = torch.empty(n_tok, spec.k, dtype=torch.float32, device=dev)
    key = (stream_key(spec.seed, spec.step),) if v2 else ()
    backend.sample(logits, keys, *key, label_col, owns_label, norms.ok, norms.total, norms.rank_cum, norms.rank_scale,
                   prefix, spec, partial, cols, weights)
    return partial, cols, weights


@dataclass
class Terms:
    """Step 5: per-token loss and gradient coefficients, grad = g * (a * pi + b * q + sparse)."""

    loss: torch.Tensor  # float64 [N]
    coef_pi: torch.Tensor  # a, coefficient of the global softmax
    coef_q: torch.Tensor | None  # b, coefficient of the global softmax(x / kappa)
    coef_label: torch.Tensor | None  # sparse weight at the label (closed-form estimators)
    label_logprob: torch.Tensor
    label_prob_tempered: torch.Tensor | None = None
    reward_mean: torch.Tensor | None = None  # sum_j R_j / K


def estimator_terms(spec: Spec, norms: Normalisers, partial: torch.Tensor | None = None) -> Terms:
    """Step 5: the estimator's loss and coefficients from the global quantities (and the
    all-reduced sample partials for "sample")."""
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
    if spec.estimator == "sft":
        return Terms(-label_logprob, torch.ones_like(label_logprob), None, -torch.ones_like(label_logprob),
                     label_logprob)
    p_label = torch.exp(label_logprob)  # dft: -stopgrad(p_y) * log p_y
    return Terms(-p_label * label_logprob, p_label, None, -p_label, label_logprob)


# --------------------------------------------------------------------------------------------
# the autograd function: orchestration only
# --------------------------------------------------------------------------------------------

_NONE = torch.empty(0)


class _VocabParallelOTR(torch.autograd.Function):
    """Forward: the named steps above. Backward: the backend's gradient step, chunk by chunk.

    Outputs: (loss, label_logprob, label_prob_tempered, hits, reward_mean, valid, sample_cols); all but
    the loss are statistics, marked non-differentiable (empty where the estimator has none).
    """

    @staticmethod
    def forward(ctx, logits, labels, keys, spec: Spec, backend: Backend, group, ignore_index, chunk, inplace):
        valid, owns_label, label_col = label_columns(labels, spec, ignore_index)
        stats, prefix = local_statistics(backend, spec, logits, label_col, owns_label, chunk, valid)
        allstats = _all_gather(stats, group, spec.world)  # [tp, N, C]
        norms = global_normalisers(allstats, spec, valid)
        ok = norms.ok
        partial = cols = weights = None
        if spec.estimator == "sample":
            partial, cols, weights = draw_samples(backend, spec, logits, keys, label_col, owns_label, norms, prefix)
            if group is not None:
                dist.all_reduce(partial, group=group)
        terms = estimator_terms(spec, norms, partial)
        if cols is None:  # closed forms: one sparse entry per token, at the label on its owner
            owner = owns_label & ok
            cols = torch.where(owner, label_col, -1)[:, None]
            weights = torch.where(owner, terms.coef_label, 0.0).float()[:, None]

        zero = torch.zeros_like(norms.lse)
        nan = torch.full_like(zero, math.nan)
        # non-finite logits give a NaN loss and gradient; ignored tokens exactly zero
        loss = torch.where(ok, terms.loss, torch.where(valid, nan, zero))
        coef_pi = torch.where(ok, terms.coef_pi * norms.share_pi, torch.where(valid, nan, zero)).float()
        coef_q = None
        if terms.coef_q is not None:
            coef_q = torch.where(ok, terms.coef_q * norms.share_q, zero).float()
        weights = torch.where(ok[:, None], weights, 0.0)

        ctx.save_for_backward(logits)
        ctx.coef_pi, ctx.coef_q, ctx.cols, ctx.weights, ctx.valid = coef_pi, coef_q, cols, weights, valid
        ctx.spec, ctx.backend, ctx.chunk, ctx.inplace = spec, backend, chunk, inplace
        # the Triton gradient reads the logits once when given this rank's own max and sums
        ctx.local = stats if backend.name == "triton" else None

        def stat(t):
            return _NONE.to(logits.device) if t is None else t

        outs = (stat(terms.label_logprob), stat(terms.label_prob_tempered),
                stat(partial[:, 0] if partial is not None else None), stat(terms.reward_mean), valid,
                cols if spec.estimator == "sample" else stat(None))
        ctx.mark_non_differentiable(*outs)
        return (loss.float(),) + outs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (logits,) = ctx.saved_tensors
        spec, backend, chunk = ctx.spec, ctx.backend, ctx.chunk
        n_tok = logits.size(0)
        g = grad_loss.reshape(-1).float()
        out = logits if ctx.inplace else torch.empty_like(logits)
        scratch = backend.scratch(min(chunk, n_tok), spec.n_real, logits.device)
        for lo in range(0, n_tok, chunk):
            hi = min(n_tok, lo + chunk)
            backend.grad(logits[lo:hi], out[lo:hi], g[lo:hi], ctx.coef_pi[lo:hi],
                         ctx.coef_q[lo:hi] if ctx.coef_q is not None else None, ctx.cols[lo:hi],
                         ctx.weights[lo:hi], ctx.valid[lo:hi], spec, scratch,
                         **({"local": ctx.local[lo:hi]} if ctx.local is not None else {}))
        return out, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def vocab_parallel_otr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: OTRConfig,
    tp_group=None,
    step: int = 0,
    vocab_size: int | None = None,
    token_keys: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_stats: bool = False,
    padded_vocab_size: int | None = None,
):
    """Per-token One-Token Rollout loss over this rank's vocabulary shard.

    logits: ``[..., V/tp]`` shard of rank ``r`` (global ids ``[r*V/tp, (r+1)*V/tp)``), any float dtype.
    labels: ``[...]`` int64 global ids, identical on every TP rank; ``ignore_index`` marks unsupervised
        positions (zero loss, zero gradient, no samples drawn).
    step / token_keys: with ``cfg.seed`` the whole random key: each token's samples depend only on
        (seed, step, key, sample index). Default keys are the flat token index within this call;
        pass global keys (sample id x max length + position) for layout- and resume-invariant draws.
    vocab_size: real vocabulary size; padded ids are never sampled and excluded from the softmax.
    padded_vocab_size: if given, checked against ``logits.size(-1) * tp`` (catches gathered logits).

    Returns the float32 per-token loss shaped like ``labels`` (normalisation is the caller's), and
    with ``return_stats=True`` also a dict of per-token tensors: ``label_logprob``, ``valid`` and, for
    the tempered estimators, ``label_prob_tempered``; for ``estimator="sample"`` ``hits`` (how many of
    the K samples equal the label), ``reward_mean`` (sum_j R_j / K) and ``owned_samples``, a pair
    (flat token index, global id) of 1-D tensors listing the samples this rank drew.
    """
    world, rank = _tp_layout(tp_group)
    vocab_size = _check_args(logits, labels, cfg, token_keys, vocab_size, padded_vocab_size, step, world)
    shape = labels.shape
    shard = logits.size(-1)
    flat_logits = logits.reshape(-1, shard)
    if not flat_logits.is_contiguous():
        flat_logits = flat_logits.contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64)
    keys = (torch.arange(flat_labels.numel(), device=labels.device) if token_keys is None
            else token_keys.reshape(-1).to(torch.int64))

    prints = _all_gather(_fingerprint(flat_labels, keys, vocab_size, ignore_index, cfg, step, shard), tp_group, world)
    _verify_fingerprints(prints, flat_labels, vocab_size, ignore_index)

    spec = make_spec(cfg, step, rank, world, shard, vocab_size)
    backend = get_backend(cfg.backend, flat_logits.device)
    if cfg.chunk_tokens:
        chunk = cfg.chunk_tokens
    elif backend.name == "triton":  # no workspace, one program per row: every row in one launch
        chunk = max(1, flat_logits.size(0))
    else:
        chunk = _default_chunk_tokens(shard, flat_logits.device.type == "cuda")
    loss, label_logprob, q_label, hits, reward_mean, valid, cols = _VocabParallelOTR.apply(
        flat_logits, flat_labels, keys, spec, backend, tp_group, ignore_index, chunk, cfg.inplace_backward)
    loss = loss.view(shape)
    if not return_stats:
        return loss

    def per_token(value):
        return torch.where(valid, value, torch.zeros_like(value)).float().view(shape)

    stats = {"label_logprob": per_token(label_logprob), "valid": valid.view(shape)}
    if spec.tempered:
        stats["label_prob_tempered"] = per_token(q_label)
    if spec.estimator == "sample":
        stats["hits"] = torch.where(valid, hits, 0.0).round().to(torch.int64).view(shape)
        stats["reward_mean"] = per_token(reward_mean)
        # this rank's draws, one entry per sample (duplicates repeated): (flat token index, global id)
        tok, j = (cols >= 0).nonzero(as_tuple=True)  # the second (optional) host sync
        stats["owned_samples"] = (tok, cols[tok, j].long() + rank * shard)
    return loss, stats
