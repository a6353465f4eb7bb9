"""Reference backend of the three compute steps in plain PyTorch (CPU and CUDA).

Signatures, shapes and units are those documented in `core/contract.py`; the sampling arithmetic is
docs/sampling.md. Nothing here synchronises with the host: no `.item()`, `nonzero`, boolean
indexing or `bool(tensor)`; every fallback is an unconditional tensor op, every shape is static.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F

from otr_megatron.core.contract import STAT_LABEL, STAT_MAX, STAT_SUMEXP, STAT_TMASS, STAT_TMEAN, Spec
from otr_megatron.core.random import token_uniforms_from_key


def _softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ATen's fused softmax over the last dim into a preallocated buffer (about one copy's cost)."""
    return torch.ops.aten._softmax.out(x, -1, False, out=out)


def _log_softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


class _Scratch:
    """Three fp32 [chunk, n_real] buffers reused by every chunk of one forward or backward.

    Fresh per-chunk allocations page-fault on CPU (about 20% of the loss time in the benchmark).
    """

    def __init__(self, rows: int, cols: int, device):
        self.bufs = torch.empty(3, rows, cols, dtype=torch.float32, device=device)
        self.zero = torch.zeros(1, 1, dtype=torch.float32, device=device)

    def views(self, x: torch.Tensor, keep_rows: torch.Tensor | None = None):
        """(x as fp32, two scratch buffers): fp32 input is used as is and never written. With
        ``keep_rows`` ([R] bool), other rows of the fp32 copy are 0, fused into the upcast."""
        rows = x.size(0)
        a, b, c = (t[:rows] for t in self.bufs)
        if x.dtype == torch.float32:
            return x, b, c
        if keep_rows is None:
            a.copy_(x)
        elif x.dtype == torch.float64:
            a.copy_(x).masked_fill_(~keep_rows[:, None], 0.0)
        else:  # a [1, 1] fp32 operand promotes the select to fp32: an exact upcast, one pass
            torch.where(keep_rows[:, None], x, self.zero, out=a)
        return a, b, c

    def free_after(self, xf: torch.Tensor) -> torch.Tensor:
        """A buffer that may be overwritten once `xf` has been read for the last time."""
        return self.bufs[0][: xf.size(0)]


def scratch(rows: int, cols: int, device) -> _Scratch | None:
    return _Scratch(rows, cols, device) if rows and cols else None


def _inv_kappa(spec: Spec) -> float:
    """float32(1 / kappa): the factor every tempered exp uses, in both passes and both backends."""
    return struct.unpack("<f", struct.pack("<f", 1.0 / spec.kappa))[0]


def _block_max(t: torch.Tensor, block: int) -> torch.Tensor:
    """Max of each block of ``t [rows, n_blocks * block]`` -> ``[rows, n_blocks]`` (exact; NaN propagates)."""
    return F.max_pool1d(t.unsqueeze(1), block, block).squeeze(1)


def _tempered_exp(xb: torch.Tensor, bmax: torch.Tensor, inv_kappa: float, out: torch.Tensor) -> torch.Tensor:
    """Blocks ``xb [..., B]`` (fp32, padding -inf) -> exp((x - bmax_b) * inv_kappa32) into ``out`` (any
    strides, may be ``xb``). The one formula of both passes and both backends (docs/sampling.md 2)."""
    safe = torch.where(bmax == -math.inf, 0.0, bmax)  # a block with no finite id: exp(-inf) = 0, not NaN
    return torch.sub(xb, safe.unsqueeze(-1), out=out).mul_(inv_kappa).exp_()


def _tree_sum(e: torch.Tensor, dim: int) -> torch.Tensor:
    """Pairwise fp32 sum over ``dim`` (B -> B/2 -> ... -> 1, ``e[i] + e[i + width]``), in place: its
    rounding depends on the block's values only, never on the batch around it."""
    width = e.size(dim)
    while width > 1:
        width //= 2
        e.narrow(dim, 0, width).add_(e.narrow(dim, width, width))
    return e.select(dim, 0)


def local_stats(x, label_col, owns_label, valid, spec: Spec, stats_out, prefix_out, scratch):
    """Per-rank statistics of a chunk of rows (see `core/contract.py`)."""
    rows, n = x.size(0), spec.n_real
    stats_out[:, STAT_LABEL] = torch.where(owns_label, x.gather(1, label_col[:, None]).squeeze(1).double(), 0.0)
    if n == 0:
        stats_out[:, STAT_MAX].fill_(-math.inf)
        stats_out[:, STAT_SUMEXP].zero_()
        if spec.tempered:
            stats_out[:, STAT_TMASS:].zero_()
        return
    xf, buf, spare = scratch.views(x[:, :n])
    m = xf.amax(-1)  # NaN if a logit is NaN
    empty = m == -math.inf  # every real id masked: no mass here (log_softmax would give NaN)
    # the sums are read off the fused kernels (an exp costs about as much as a whole softmax):
    # at the argmax log_softmax(x) = -log sum exp(x - m), its largest value
    _log_softmax(xf, out=buf)
    stats_out[:, STAT_MAX] = m
    stats_out[:, STAT_SUMEXP] = torch.where(empty, 0.0, torch.exp(-buf.amax(-1)))
    inv = _inv_kappa(spec)
    if spec.estimator == "expected":
        # masked -inf logits would give 0 * -inf in the mean: clamp them (q is 0 there anyway)
        y = torch.clamp(xf, min=torch.finfo(torch.float32).min, out=buf).mul_(inv)
        q = _softmax(y, out=spare)
        stats_out[:, STAT_TMASS] = torch.where(empty, 0.0, 1.0 / q.amax(-1))  # q(argmax) = 1 / sum
        mean = torch.matmul(q.unsqueeze(1), y.unsqueeze(2)).view(-1) * spec.kappa
        stats_out[:, STAT_TMEAN] = torch.where(empty, 0.0, mean)
    elif spec.estimator == "sample":
        # per block of B real ids (docs/sampling.md section 2): bmax_b, and bsum_b, the pairwise-tree
        # fp32 sum of exp((x - bmax_b) * inv_kappa32). Both depend on the block's values only.
        b, nb = spec.block, spec.n_blocks
        if nb * b == n:
            xp = xf
            e_t = buf.view(rows, b, nb)
        else:  # the last real block ends in padding: pad it with -inf
            xp = torch.full((rows, nb * b), -math.inf, dtype=torch.float32, device=x.device)
            xp[:, :n] = xf
            e_t = torch.empty(rows, b, nb, dtype=torch.float32, device=x.device)
        bmax = _block_max(xp, b)
        # the exponentials are written block-element-major ([rows, B, n_blocks]): the tree's adds are
        # then whole contiguous rows (about 4x cheaper on CPU than adding runs of B/2, B/4, ... ids)
        _tempered_exp(xp.view(rows, nb, b), bmax, inv, out=e_t.permute(0, 2, 1))
        bsum = _tree_sum(e_t, 1)
        # block weights in units of exp(m_r / kappa), float64 prefix sums; Z_r is the last one
        m64 = torch.where(empty, 0.0, m.double())[:, None]
        w = torch.exp((bmax.double() - m64) / spec.kappa).mul_(bsum.double())
        torch.cumsum(w, -1, out=prefix_out)
        stats_out[:, STAT_TMASS] = prefix_out[:, -1]


def _count_below(sorted_rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """searchsorted(rows, value) (left) for one value per row: the first index reaching it."""
    return torch.searchsorted(sorted_rows, value.contiguous())


def _sample_rows(spec: Spec, device) -> int:
    """Rows per sampling step: bounds the [rows, K, B] temporaries (about 40 bytes per element).
    CPU: ~1M elements (cache-sized); CUDA: ~16M elements (a few steps per call, ~640 MB).
    A function of K and B only, so a sample sits at the same position in every TP layout."""
    target = 1 << 24 if device.type == "cuda" else 1 << 20
    return max(1, target // (spec.k * spec.block))


def sample(x, keys, key_mix, label_col, owns_label, ok, total, rank_cum, rank_scale, prefix, spec: Spec, partial_out,
           cols_out, weights_out, lanes_out=None, scratch=None):
    """Hierarchical inverse-CDF draw of K samples per row (docs/sampling.md section 4)."""
    n_tok, shard = x.shape
    k, b, nb = spec.k, spec.block, spec.n_blocks
    if nb == 0:  # no real id on this rank: it owns no sample
        partial_out.zero_()
        cols_out.fill_(-1)
        weights_out.zero_()
        if lanes_out is not None:
            lanes_out.fill_(-1)
        return
    inv = _inv_kappa(spec)
    dev = x.device
    blocks = x.view(n_tok * (shard // b), b)  # block (row, i) is row row * shard / B + i
    in_block = torch.arange(b, device=dev)
    ragged = spec.n_real % b != 0
    step_rows = _sample_rows(spec, dev)
    for lo in range(0, n_tok, step_rows):
        hi = min(n_tok, lo + step_rows)
        rows = hi - lo
        okr = ok[lo:hi]
        # 1-2. global CDF position and the owning rank, identically on every rank
        t = token_uniforms_from_key(keys[lo:hi], k, key_mix) * torch.where(okr, total[lo:hi], 0.0)[:, None]
        if spec.world == 1:  # one rank owns everything; its reference is the global one (t_r = t)
            mine = okr[:, None].expand(rows, k)
            t_r = t
        else:
            cum = rank_cum[lo:hi]
            last_rank = _count_below(cum, cum[:, -1:])  # first rank reaching the total: last with mass
            owner = torch.minimum(torch.searchsorted(cum, t, right=True), last_rank)
            mine = (owner == spec.rank) & okr[:, None]
            # 3. this rank's block, in units of its own reference exp(m_r / kappa)
            before = cum[:, spec.rank - 1 : spec.rank] if spec.rank > 0 else torch.zeros_like(cum[:, :1])
            t_r = ((t - before) / rank_scale[lo:hi, None]).clamp_(min=0.0)
        pre = prefix[lo:hi]
        last_blk = _count_below(pre, pre[:, -1:])  # last block with positive weight
        blk = torch.minimum(torch.searchsorted(pre, t_r, right=True), last_blk).clamp_(max=nb - 1)
        c_hi = pre.gather(1, blk)
        c_lo = torch.where(blk > 0, pre.gather(1, (blk - 1).clamp_(min=0)), 0.0)
        # 4. fraction of the way through the block (float64)
        frac = ((t_r - c_lo) / (c_hi - c_lo)).clamp_(0.0, 1.0)
        # 5. recompute that block's tempered masses (fp32), search their float64 prefix sums
        row_ids = torch.arange(lo, hi, device=dev)[:, None] * (shard // b)
        xb = blocks.index_select(0, (row_ids + blk).view(-1))  # [M = rows * K, B], input dtype
        if ragged:
            real = (blk.view(-1, 1) * b + in_block) < spec.n_real
            xb = xb.float().masked_fill_(~real, -math.inf)
        bmax = _block_max(xb.reshape(1, -1), b).view(-1).float()
        # exponentials written id-major ([B, M]): the float64 prefix sums and the searches are then
        # B contiguous vector ops instead of M tiny rows (same values as cumsum: sequential adds)
        e_t = torch.empty(b, xb.size(0), dtype=torch.float32, device=dev)
        _tempered_exp(xb, bmax, inv, out=e_t.T)
        s = torch.empty(b, xb.size(0), dtype=torch.float64, device=dev)
        s[0] = e_t[0]
        for i in range(1, b):
            torch.add(s[i - 1], e_t[i], out=s[i])
        target = frac.view(-1) * s[-1]
        last_pos = (s < s[-1]).sum(0)  # first id reaching the block total: the last with positive mass
        # searchsorted(s, target, right=True): the count of prefix sums <= target
        pos = torch.minimum((s <= target).sum(0), last_pos).clamp_(max=b - 1)
        col = blk * b + pos.view(rows, k)
        logit = x.view(-1)[(row_ids * b + col).view(-1)].view(rows, k).double()  # xb is overwritten
        hit = mine & (col == label_col[lo:hi, None]) & owns_label[lo:hi, None]
        reward = torch.where(hit, 1.0, spec.beta)
        partial_out[lo:hi, 0] = hit.sum(-1)
        partial_out[lo:hi, 1] = torch.where(mine, reward * logit, 0.0).sum(-1)
        cols_out[lo:hi] = torch.where(mine, col, -1)
        weights_out[lo:hi] = torch.where(mine, -reward / k, 0.0)
    if lanes_out is not None:  # duplicates are kept in cols_out, so it is the lane list
        lanes_out.copy_(cols_out)


def grad(x, out, g, coef_pi, coef_q, cols, weights, valid, spec: Spec, scratch, local=None):
    """Gradient of a chunk of rows (see `core/contract.py`); one rounding to ``out.dtype``."""
    rows, n = x.size(0), spec.n_real
    if n < x.size(1):
        out[:, n:].zero_()  # padded ids: not part of the softmax
    if n == 0:
        return
    # ignored rows are exactly 0 even for non-finite logits: zero them in the upcast (free), or after
    xf, p, spare = scratch.views(x[:, :n], keep_rows=valid)
    _softmax(xf, out=p).mul_((coef_pi * g)[:, None])  # local softmax x this rank's global share
    if coef_q is not None:
        tempered = torch.mul(xf, _inv_kappa(spec), out=spare)
        q = scratch.free_after(xf)  # the upcast copy (or an idle buffer for fp32 input)
        p.addcmul_(_softmax(tempered, out=q), (coef_q * g)[:, None])
    # scatter-add of the sparse entries (duplicates accumulate; col -1 = none, weight 0 there)
    flat = (torch.arange(rows, device=x.device)[:, None] * n + cols.clamp(min=0)).view(-1)
    p.view(-1).index_add_(0, flat, (weights * g[:, None]).view(-1))
    if xf.dtype == x.dtype:  # fp32 input was not copied: zero the ignored rows here
        p.masked_fill_(~valid[:, None], 0.0)
    out[:, :n].copy_(p)  # the one rounding to the input dtype
