"""Reference backend of the three compute steps in plain PyTorch (CPU and CUDA).

Signatures, shapes and units are those documented in `core/contract.py` (contract v2); the sampling
arithmetic is docs/sampling.md. Nothing here synchronises with the host, copies a Python value to the
device, or takes a data-dependent shape (no `.item()`, `nonzero`, boolean indexing, `bool(tensor)`,
`torch.tensor(list)`): every fallback is an unconditional tensor op, so a CUDA graph can capture it.

CPU cost notes (measured with `python -m otr_megatron.bench`): a pass over a cache-resident fp32
chunk costs ~0.1 ns per element, a masked `where`/`masked_fill_` over it ~0.6-0.9 ns, `torch.exp`
~1.1 ns and a fused (log_)softmax ~0.6 ns. So the [rows, V] data is read from memory once per
entry point, masks are applied to per-row numbers instead of to the rows, and the block statistics
work on a block-element-major copy ([rows, B, n_blocks]) made in the upcast.
"""

from __future__ import annotations

import math
import struct

import torch

from otr_megatron.core.contract import STAT_LABEL, STAT_MAX, STAT_SUMEXP, STAT_TMASS, STAT_TMEAN, Spec
from otr_megatron.core.random import token_uniforms_from_key

_F32_MIN = torch.finfo(torch.float32).min
_BELOW_ONE = 1.0 - 2.0**-53  # x * _BELOW_ONE is the float64 just below x, for x >= 2**-1021


def _softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ATen's fused softmax over the last dim into a preallocated buffer (about one copy's cost)."""
    return torch.ops.aten._softmax.out(x, -1, False, out=out)


def _log_softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


class _Scratch:
    """Three fp32 [chunk, n_real] buffers (and one of the input's 2-byte dtype, made on first use)
    reused by every chunk of one forward or backward: fresh per-chunk allocations page-fault on CPU
    (about 20% of the loss time in the benchmark)."""

    def __init__(self, rows: int, cols: int, device):
        self.rows = rows
        self.bufs = tuple(torch.empty(rows, cols, dtype=torch.float32, device=device) for _ in range(3))
        self.half = None

    def take(self, rows: int):
        return self.bufs if rows == self.rows else tuple(t[:rows] for t in self.bufs)

    def half_buf(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        if self.half is None or self.half.dtype != dtype:
            self.half = torch.empty_like(self.bufs[0], dtype=dtype)
        return self.half[:rows]


def scratch(rows: int, cols: int, device) -> _Scratch | None:
    return _Scratch(rows, cols, device) if rows and cols else None


def _inv_kappa(spec: Spec) -> float:
    """float32(1 / kappa): the factor every tempered exp uses, in both passes and both backends."""
    return struct.unpack("<f", struct.pack("<f", 1.0 / spec.kappa))[0]


def _blocks_major(x: torch.Tensor, rows: int, b: int, nb: int, out: torch.Tensor, sc: _Scratch) -> None:
    """``out [rows, B, nb]`` (fp32) <- ``x [rows, nb * B]``, block-element-major, in one read of x:
    element i of block j lands at ``out[:, i, j]``. 2-byte dtypes are transposed as int16 (a plain
    copy kernel, ~1.5x faster than a converting strided copy), then upcast in cache."""
    if x.element_size() == 2:
        half = sc.half_buf(rows, x.dtype).view(rows, b, nb)
        half.view(torch.int16).copy_(x.view(torch.int16).view(rows, nb, b).transpose(1, 2))
        out.copy_(half)
    else:
        out.copy_(x.view(rows, nb, b).transpose(1, 2))


def local_stats(x, label_col, owns_label, valid, spec: Spec, stats_out, prefix_out, scratch):
    """Per-rank statistics of a chunk of rows (see `core/contract.py`). Rows with ``valid`` False
    get the skipped-row values (MAX -inf, the rest 0, prefix 0), as a backend that skips them."""
    rows, n = x.size(0), spec.n_real
    invalid = ~valid
    stats_out[:, STAT_LABEL] = x.gather(1, label_col[:, None]).squeeze(1).masked_fill_(~owns_label, 0.0)
    if n == 0:
        stats_out[:, STAT_MAX].fill_(-math.inf)
        stats_out[:, STAT_SUMEXP:STAT_LABEL].zero_()
        if spec.tempered:
            stats_out[:, STAT_TMASS:].zero_()
        if prefix_out is not None:
            prefix_out.zero_()
        return
    a, buf, spare = scratch.take(rows)
    sample = spec.estimator == "sample"
    if sample:
        b, nb = spec.block, spec.n_blocks
        if nb * b == n:
            at = a.view(rows, b, nb)
            _blocks_major(x[:, :n], rows, b, nb, at, scratch)
            row = a
        else:  # the last real block ends in padding: a padded copy, padding -inf (exp gives 0)
            at = torch.full((rows, b, nb), -math.inf, dtype=torch.float32, device=x.device)
            full = (nb - 1) * b
            at[:, :, : nb - 1].copy_(x[:, :full].view(rows, nb - 1, b).transpose(1, 2))
            at[:, : n - full, nb - 1].copy_(x[:, full:n])
            row = at.view(rows, nb * b)
            buf = torch.empty_like(row)
        bmax = at.amax(1)  # [rows, nb]: fp32 max of each block's real ids (NaN propagates)
        m = bmax.amax(-1)  # the row's max is the max of its block maxima
    else:
        row = a.copy_(x[:, :n])
        m = row.amax(-1)  # NaN if a logit is NaN
    m.masked_fill_(invalid, -math.inf)
    empty = m == -math.inf  # every real id masked (or a skipped row): no mass here
    # the sum is read off the fused kernel (an exp costs about as much as a whole log_softmax): at
    # the argmax log_softmax(x) = -log sum exp(x - m), its largest value. The row's order (block-major
    # for "sample") changes only the rounding of this sum, never a sample.
    lsm = _log_softmax(row, out=buf)
    stats_out[:, STAT_MAX] = m
    stats_out[:, STAT_SUMEXP] = lsm.amax(-1).neg_().exp_().masked_fill_(empty, 0.0)
    inv = _inv_kappa(spec)
    if spec.estimator == "expected":
        # masked -inf logits would give 0 * -inf in the mean: clamp them (q is 0 there anyway)
        y = torch.clamp(row, min=_F32_MIN, out=buf).mul_(inv)
        q = _softmax(y, out=spare)
        stats_out[:, STAT_TMASS] = q.amax(-1).reciprocal_().masked_fill_(empty, 0.0)  # q(argmax) = 1 / sum
        mean = torch.mul(q, y, out=a).sum(-1, dtype=torch.float64).mul_(spec.kappa)
        stats_out[:, STAT_TMEAN] = mean.masked_fill_(empty, 0.0)
    elif sample:
        # per block of B real ids (docs/sampling.md section 2): bsum_b, the pairwise-tree fp32 sum of
        # exp((x - bmax_b) * inv_kappa32), in place on the block-element-major copy, so the tree's adds
        # are whole contiguous rows. Both bmax_b and bsum_b depend on the block's values only.
        safe = bmax.masked_fill(bmax == -math.inf, 0.0)  # a block with no finite id: exp(-inf) = 0, not NaN
        at.sub_(safe.unsqueeze(1)).mul_(inv).exp_()
        width = b
        while width > 1:
            width //= 2
            at.narrow(1, 0, width).add_(at.narrow(1, width, width))
        bsum = at.select(1, 0)
        # block weights in units of exp(m_r / kappa), float64 prefix sums; Z_r is the last one. The clamp
        # stands in for m_r = -inf (then every bmax_b is -inf too and w_b = exp(-inf) * 0 = 0).
        m64 = m.double().clamp_(min=-torch.finfo(torch.float64).max).unsqueeze(1)
        w = bmax.double().sub_(m64).div_(spec.kappa).exp_().mul_(bsum).masked_fill_(invalid.unsqueeze(1), 0.0)
        torch.cumsum(w, -1, out=prefix_out)
        stats_out[:, STAT_TMASS] = prefix_out[:, -1]


def _sample_rows(spec: Spec, device) -> int:
    """Rows per sampling step: bounds the [rows, K, B] temporaries (about 40 bytes per element).
    CPU: ~1M elements (cache-sized); CUDA: ~16M elements (a few steps per call, ~640 MB).
    A function of K and B only, so a sample sits at the same position in every TP layout."""
    target = 1 << 24 if device.type == "cuda" else 1 << 20
    return max(1, target // (spec.k * spec.block))


def sample(x, keys, key_mix, label_col, owns_label, ok, total, rank_cum, rank_scale, prefix, spec: Spec,
           partial_out, cols_out, weights_out, lanes_out=None, scratch=None):
    """Hierarchical inverse-CDF draw of K samples per row (docs/sampling.md section 4). ``key_mix``: the
    call's stream key, a Python int or a 0-dim int64 tensor on x's device (same draws). Duplicates are
    left in ``cols_out`` (int32; the gradient accumulates them), so ``lanes_out`` is a copy of it."""
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
    per_row = shard // b
    blocks = x.view(n_tok * per_row, b)  # block (row, i) is row row * shard / B + i
    ragged = spec.n_real % b != 0
    in_block = torch.arange(b, device=dev).unsqueeze(1) if ragged else None
    step_rows = _sample_rows(spec, dev)
    for lo in range(0, n_tok, step_rows):
        hi = min(n_tok, lo + step_rows)
        rows = hi - lo
        okr = ok[lo:hi, None]
        # 1-2. global CDF position and the owning rank, identically on every rank
        t = token_uniforms_from_key(keys[lo:hi], k, key_mix).mul_(torch.where(ok[lo:hi], total[lo:hi], 0.0)[:, None])
        if spec.world == 1:  # one rank owns everything; its reference is the global one (t_r = t)
            mine = okr
        else:
            cum = rank_cum[lo:hi]
            last_rank = torch.searchsorted(cum, cum[:, -1:].contiguous())  # first rank reaching the total: last with mass
            owner = torch.minimum(torch.searchsorted(cum, t, right=True), last_rank)
            mine = (owner == spec.rank).logical_and_(okr)
            # 3. this rank's block, in units of its own reference exp(m_r / kappa)
            if spec.rank > 0:
                t.sub_(cum[:, spec.rank - 1 : spec.rank])
            t.div_(rank_scale[lo:hi, None]).clamp_(min=0.0)
        pre = prefix[lo:hi]
        last_blk = torch.searchsorted(pre, pre[:, -1:].contiguous()).clamp_(max=nb - 1)  # last block with positive weight
        blk = torch.minimum(torch.searchsorted(pre, t, right=True), last_blk)
        c_hi = pre.gather(1, blk)
        c_lo = torch.where(blk > 0, pre.gather(1, (blk - 1).clamp_(min=0)), 0.0)
        # 4. fraction of the way through the block (float64)
        frac = t.sub_(c_lo).div_(c_hi.sub_(c_lo)).clamp_(0.0, 1.0)
        # 5. recompute that block's tempered masses (fp32), search their float64 prefix sums
        flat_blk = blk + torch.arange(lo * per_row, hi * per_row, per_row, device=dev).unsqueeze(1)
        xb = blocks.index_select(0, flat_blk.view(-1))  # [M = rows * K, B], input dtype
        # id-major ([B, M]) in the upcast: the max, the exps, the float64 prefix sums (sequential adds,
        # as cumsum) and the search are then contiguous vector ops instead of M tiny rows
        e = torch.empty(b, xb.size(0), dtype=torch.float32, device=dev).copy_(xb.T)
        if ragged:
            e.masked_fill_(in_block + blk.view(1, -1) * b >= spec.n_real, -math.inf)
        bmax = e.amax(0)
        e.sub_(bmax.masked_fill_(bmax == -math.inf, 0.0)).mul_(inv).exp_()
        s = e.double()  # sequential float64 prefix sums in place: B vector adds (cumsum over dim 0 is a scalar loop)
        ids = s.unbind(0)
        for i in range(1, b):
            ids[i].add_(ids[i - 1])
        # searchsorted(s, target, right=True), capped at the first id reaching the block total (the last
        # with positive mass): the count of prefix sums <= min(target, the float64 below the total)
        last = s[-1]
        thr = torch.minimum(frac.view(-1).mul_(last), last * _BELOW_ONE)
        pos = (s <= thr).view(torch.uint8).sum(0, dtype=torch.uint8).clamp_(max=b - 1).unsqueeze(1)
        logit = xb.gather(1, pos.long()).view(rows, k).double()
        col = pos.view(rows, k) + blk * b
        hit = (col == label_col[lo:hi, None]).logical_and_(mine).logical_and_(owns_label[lo:hi, None])
        reward = torch.where(hit, 1.0, spec.beta)
        partial_out[lo:hi, 0] = hit.sum(-1)
        partial_out[lo:hi, 1] = torch.where(mine, reward * logit, 0.0).sum(-1)
        other = ~mine
        cols_out[lo:hi] = col.masked_fill_(other, -1)
        weights_out[lo:hi] = reward.div_(-k).masked_fill_(other, 0.0)
    if lanes_out is not None:
        lanes_out.copy_(cols_out)


def grad(x, out, g, coef_pi, coef_q, cols, weights, valid, spec: Spec, scratch, local=None):
    """Gradient of a chunk of rows (see `core/contract.py`); one rounding to ``out.dtype``.

    Ignored rows are made exactly 0 through their per-row factors (0 where ``valid`` is False) and
    ``nan_to_num``: a softmax is NaN only on a row whose logits are not all finite, which the loss
    gives a NaN coefficient (a NaN gradient, as asked) or, ignored, a zero one. Masking the rows
    themselves (``where``/``masked_fill_`` over [rows, V]) would cost as much as the softmax. ``local``
    (the forward's statistics) is not used: the fused softmax recomputes them in cache."""
    rows, n = x.size(0), spec.n_real
    if n < x.size(1):
        out[:, n:].zero_()  # padded ids: not part of the softmax
    if n == 0:
        return
    a, p, spare = scratch.take(rows)
    xf = x[:, :n] if x.dtype == torch.float32 else a.copy_(x[:, :n])  # fp32 input is only read
    gv = torch.where(valid, g, 0.0)
    # local softmax x this rank's global share
    _softmax(xf, out=p).nan_to_num_(0.0).mul_(torch.where(valid, coef_pi * g, 0.0).unsqueeze(1))
    if coef_q is not None:
        tempered = torch.mul(xf, _inv_kappa(spec), out=spare)
        q = _softmax(tempered, out=a).nan_to_num_(0.0)  # a: the upcast copy, read already (or idle)
        p.addcmul_(q, torch.where(valid, coef_q * g, 0.0).unsqueeze(1))
    # the sparse entries (col -1 = none, weight 0 there), duplicates accumulate in lane order
    p.scatter_add_(1, cols.clamp(min=0).long(), weights * gv.unsqueeze(1))
    out[:, :n].copy_(p)  # the one rounding to the output dtype
