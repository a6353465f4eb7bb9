"""Fused Triton kernels for the three compute steps of the OTR loss (the "triton" backend).

Same entry points, shapes, units and arithmetic as the reference `core/torch_backend.py`
(contract: `core/contract.py`; sampling: docs/sampling.md), in three kernels whose grid is one
program per row (token):

- `local_stats`: one read of the row; every thread streams its own slots with its own running max
  and sums (no cross-thread work in the loop). Online max (with an explicit NaN flag: `tl.max` drops
  NaN, `torch.max` does not), sum exp(x - m), for "expected" the tempered sum and mean, the label
  logit; for "sample" a tile of blocks loaded at once (adjacent lanes read adjacent 16-byte pieces:
  one instruction reads each 32-byte sector whole), moved once through shared memory so that a block
  of B ids sits in R = B / 16 lanes (16 ids each: the tree is register adds, then log2(R) shuffles),
  and the per-block (bmax, bsum) pairs, parked bit-packed in the float64 prefix buffer until the row
  max is known (or, for rows of at most NT_MAX tiles, kept in registers over unrolled tiles), then an
  epilogue turns them into the float64 block weights and prefix sums in place (no extra memory).
  The prefix row of an ignored row is not written.
- `sample`: K lanes per row. SplitMix64 uniforms computed in the kernel (bit-exact with
  `core/random.py`), owner rank by compare, the owned lanes sorted first; then, KC owned lanes at a
  time (KC ~ 2K/tp: a rank's work grows with the samples it owns), block by binary search over the
  prefix sums and the one block of B ids recomputed and searched (docs/sampling.md section 4, step
  5's rescale); duplicates merged by one segmented scan over the sorted lanes.
- `grad`: dense g * (coef_pi * softmax(x) [+ coef_q * softmax(x / kappa)]) written once, then,
  after a CTA barrier, the sparse entries of the row rewritten with their duplicates merged in
  registers (no atomics); the logits at those columns are picked from the dense tiles as they pass
  (a shared-memory gather per tile; a label column: read before the dense pass), so it works in
  place. One rounding to the output dtype; ignored rows and padded columns exact 0.

Bit-exactness with the torch backend where it matters for sampling: the block exps use
libdevice's expf/exp on a GPU (the function torch's CUDA `exp` calls), the block sum is the same
pairwise tree, and the float64 formulas are the same. Remaining differences are float64 prefix-sum
rounding (a parallel scan on the GPU) and, in the interpreter, numpy's float32 exp.

CPU: set ``TRITON_INTERPRET=1`` before this module is imported (tests/core/conftest.py does) and
the kernels run in Triton's interpreter on CPU tensors; that is how CI tests them.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from otr_megatron.core.contract import STAT_LABEL, STAT_MAX, STAT_SUMEXP, STAT_TMASS, STAT_TMEAN, Spec
from otr_megatron.core.random import stream_key

# the statistics kernel writes these columns by position
assert (STAT_MAX, STAT_SUMEXP, STAT_LABEL, STAT_TMASS, STAT_TMEAN) == (0, 1, 2, 3, 4)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET:  # the GPU-only precise exp; the interpreter has no libdevice
    from triton.language.extra import libdevice
else:
    libdevice = None

_MAX_TILE = 8192  # elements per tile in the interpreter (few, large tiles: ~0.1 ms per op per tile)
LAST_LAUNCH: dict = {}  # kernel name -> last compiled launch handle (n_regs, n_spills for bench_gpu)


# --------------------------------------------------------------------------------------------
# helpers called from the kernels (the interpreter re-patches triton.language on every call of a
# jit helper, ~8 ms, so the hot paths inline their exps instead)
# --------------------------------------------------------------------------------------------


@triton.jit
def _splitmix64(x):
    """SplitMix64 finaliser of (x + golden) on uint64 (wraps modulo 2**64), as core/random.py."""
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _uniforms(base, j):
    """float64 uniform of sample j (0-based) of a token whose stream base is `base` (uint64)."""
    bits = _splitmix64(base + (j + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
    return (bits >> 11).to(tl.float64) * 1.1102230246251565e-16  # 2**-53


@triton.jit
def _token_base(key, key_mix):
    # key_mix arrives as i32 (or a constexpr) when its value is small: widen before the bitcast
    mix = (tl.zeros([], dtype=tl.int64) + key_mix).to(tl.uint64, bitcast=True)
    return _splitmix64(key.to(tl.uint64, bitcast=True) ^ mix)


# --------------------------------------------------------------------------------------------
# kernel 1: per-rank statistics (and block prefix sums for "sample")
# --------------------------------------------------------------------------------------------


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (as torch.max); tl.max drops it."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sample_tile(xrow, offs, lim, n_real, m_t, s_t, nanf, INV_KAPPA: tl.constexpr, NB: tl.constexpr,
                 R: tl.constexpr, L: tl.constexpr, LOGL: tl.constexpr, LOGR: tl.constexpr, MASK: tl.constexpr,
                 RAGGED: tl.constexpr, PRECISE: tl.constexpr, INTERP: tl.constexpr):
    """One tile of the "sample" statistics: NB blocks of B = R * L ids. `offs` [B, NB] (block-major
    ids, contiguous along dim 0): one load in which adjacent lanes read adjacent 16-byte pieces, so
    every 32-byte sector is read whole by one instruction. The split below (its last dim must sit in
    registers) makes the compiler move the tile through shared memory once (a transpose) into the
    compute layout: R lanes per block, lane c holding the L ids i = j * R + c (j < L) of its block,
    as two halves (j < L/2, j >= L/2) [L/2, NB, R]. The block tree e[i] + e[i + B/2], ... is then
    plain register adds over j (its first LOGL levels pair ids R, 2R, ... apart: the same residue
    c) followed by LOGR cross-lane levels over c (one shuffle each), the running max and sum stay in
    each lane's own [NB, R] slot. Returns the updated slots and the tile's block (bmax, bsum)
    (docs/sampling.md section 2). MASK: loads masked on `lim` (the shard, 0 for an ignored row);
    RAGGED: ids >= n_real are -inf (only the tile holding the row's end needs either)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    if MASK:
        x = tl.load(xrow + offs, mask=offs < lim, other=float("-inf"))
    else:
        x = tl.load(xrow + offs)
    if RAGGED:  # (in float32: the interpreter has no bf16 constants; only the row's last tile)
        x = tl.where(offs < n_real, x.to(tl.float32), float("-inf"))
    if L > 1:
        xa, xb = tl.split(tl.permute(tl.reshape(x, (2, L // 2, R, NB)), (1, 3, 2, 0)))
        xa = xa.to(tl.float32)
        xb = xb.to(tl.float32)
        pm = tl.maximum(xa, xb, propagate_nan=tl.PropagateNan.ALL)
    else:
        xa = tl.reshape(x, (1, NB, 1)).to(tl.float32)
        xb = xa
        pm = xa
    if INTERP:
        nanf = tl.maximum(nanf, tl.max(tl.max((pm != pm).to(tl.int32), axis=0), axis=1))
        bmax = tl.max(tl.max(pm, axis=0), axis=1)
    else:
        bmax = tl.reduce(tl.reduce(pm, 0, _max_nan), 1, _max_nan)
    m_new = _max_nan(m_t, bmax)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2((m_t - safe) * LOG2E)
    sl = (safe * LOG2E)[None, :, None]
    pe = tl.math.exp2(xa * LOG2E - sl)
    if L > 1:
        pe += tl.math.exp2(xb * LOG2E - sl)
    s_t = s_t * alpha[:, None] + tl.sum(pe, axis=0)
    # per block: bmax (fp32) and bsum = the pairwise-tree fp32 sum of exp((x - bmax) * INV_KAPPA)
    # (docs/sampling.md section 2)
    bsafe = tl.where(bmax == float("-inf"), 0.0, bmax)[None, :, None]
    if PRECISE:  # libdevice's expf: the function torch's CUDA exp calls (bit-equal block sums)
        e = libdevice.exp((xa - bsafe) * INV_KAPPA)
        if L > 1:
            e = e + libdevice.exp((xb - bsafe) * INV_KAPPA)  # level 1: e[i] + e[i + B/2]
    else:
        e = tl.exp((xa - bsafe) * INV_KAPPA)
        if L > 1:
            e = e + tl.exp((xb - bsafe) * INV_KAPPA)
    for lvl in tl.static_range(LOGL - 1):  # the levels within a lane: j + L/4, ... (registers)
        e = tl.sum(tl.reshape(e, (2, L >> (lvl + 2), NB, R)), axis=0)
    e = tl.reshape(e, (NB, R))
    for lvl in tl.static_range(LOGR):  # then across the block's R lanes: c + R/2, ..., c + 1
        e = tl.sum(tl.reshape(e, (NB, 2, R >> (lvl + 1))), axis=1)
    bsum = tl.reshape(e, (NB,))
    return m_new, s_t, nanf, bmax, bsum


@triton.jit
def _block_prefix(prow, e0, n_blocks, bmax, bsum, m64, carry, valid, N: tl.constexpr, KAPPA: tl.constexpr,
                  PRECISE: tl.constexpr):
    """Float64 block weights w_b = bsum_b * exp((bmax_b - m) / kappa) of a chunk of consecutive blocks,
    their prefix sums (the running total added to the chunk's first element before its scan, so the
    interpreter's sequential scan reproduces torch's sequential cumsum exactly), stored; returns the
    new running total."""
    kappa = tl.full([], KAPPA, tl.float64)  # a bare float constant would be typed fp32
    idx = e0 + tl.arange(0, N)
    inb = idx < n_blocks
    if PRECISE:
        wb = libdevice.exp((bmax.to(tl.float64) - m64) / kappa) * bsum.to(tl.float64)
    else:
        wb = tl.exp((bmax.to(tl.float64) - m64) / kappa) * bsum.to(tl.float64)
    wb = tl.where(inb, wb, 0.0)
    wb = tl.where(idx == e0, wb + carry, wb)
    c = tl.cumsum(wb, axis=0)
    tl.store(prow + idx, c, mask=inb & valid)
    tl.debug_barrier()  # the chunk's last prefix sum, read back (no block-wide reduction)
    return tl.load(prow + tl.minimum(e0 + N, n_blocks) - 1, mask=valid, other=0.0)


@triton.jit
def _stats_kernel(X, stride_x, LABEL_COL, OWNS, VALID, STATS, stride_s, PREFIX, stride_p,
                  n_real, shard, n_blocks, INV_KAPPA: tl.constexpr, KAPPA: tl.constexpr,
                  SAMPLE: tl.constexpr, EXPECTED: tl.constexpr, B: tl.constexpr, R: tl.constexpr,
                  L: tl.constexpr, LOGL: tl.constexpr, LOGR: tl.constexpr, NB: tl.constexpr, VEC: tl.constexpr,
                  NR: tl.constexpr, RAGGED: tl.constexpr, EPI: tl.constexpr, NT: tl.constexpr,
                  PRECISE: tl.constexpr, INTERP: tl.constexpr):
    # Every thread streams its own slots (the 16 ids of a block it holds for "sample", VEC ids
    # otherwise) with its own running max and sums, combined once at the end; "sample" adds a
    # shared-memory transpose per tile and log2(R) shuffles per block (see _sample_tile). Loads are
    # masked on the shard (a multiple of 16: vectorised) and the real vocabulary is applied with
    # tl.where (RAGGED); "sample" masks only the tile holding the row's end.
    # "sample" with NT > 0 (the row is NT tiles): the tiles are unrolled and every block's
    # (bmax, bsum) stays in its thread's registers until the row max is known (no round trip
    # through memory); NT == 0 (long rows): they are parked bit-packed in the prefix buffer.
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    srow = STATS + row * stride_s
    prow = PREFIX + row * stride_p
    valid = tl.load(VALID + row) != 0
    n_loop = tl.where(valid, n_real, 0)  # an ignored row is not read
    LOG2E: tl.constexpr = 1.4426950408889634
    CK: tl.constexpr = INV_KAPPA * 1.4426950408889634
    if SAMPLE:
        NS: tl.constexpr = NB
        TILE: tl.constexpr = NB * B
        rel = tl.arange(0, B)[:, None] + tl.arange(0, NB)[None, :] * B  # [B, NB]: block-major
    else:
        NS: tl.constexpr = NR
        TILE: tl.constexpr = NR * VEC
        rel = tl.arange(0, NR)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [NR, VEC]
    m_t = tl.full([NS], float("-inf"), tl.float32)
    if SAMPLE:
        s_t = tl.zeros([NB, R], dtype=tl.float32)  # one slot per lane of a block
    else:
        s_t = tl.zeros([NS], dtype=tl.float32)
    sk_t = tl.zeros([NS], dtype=tl.float32)
    tk_t = tl.zeros([NS], dtype=tl.float32)
    nanf = tl.zeros([NS], dtype=tl.int32)  # interpreter only: its tl.max drops NaN as a GPU's does
    bm_all = ()
    bs_all = ()
    if SAMPLE and NT > 0:
        lim = tl.where(valid, shard, 0)  # an ignored row is not read
        # dep (always 0, opaque to the compiler: bsum >= 0 or NaN) makes each tile's loads wait for the
        # previous tile, as a loop would: unrolled, ptxas hoists every tile's loads (255 registers)
        dep = tl.zeros([NB], dtype=tl.int32)
        for it in tl.static_range(NT):  # tiles before the last end before n_real (n_blocks = ceil(n_real / B))
            m_t, s_t, nanf, bmax, bsum = _sample_tile(xrow + dep[None, :], it * TILE + rel, lim, n_real, m_t, s_t,
                                                      nanf, INV_KAPPA, NB, R, L, LOGL, LOGR, True,
                                                      RAGGED and it == NT - 1, PRECISE, INTERP)
            dep = (bsum < 0.0).to(tl.int32) * 16
            bm_all = bm_all + (bmax,)
            bs_all = bs_all + (bsum,)
    elif SAMPLE:
        # whole tiles unmasked (they end before n_real), then the tile holding the row's end masked
        n_full = (n_loop // TILE) * TILE
        for start in range(0, n_full, TILE):
            m_t, s_t, nanf, bmax, bsum = _sample_tile(xrow, start + rel, shard, n_real, m_t, s_t, nanf, INV_KAPPA,
                                                      NB, R, L, LOGL, LOGR, False, False, PRECISE, INTERP)
            packed = (bmax.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | \
                bsum.to(tl.uint32, bitcast=True).to(tl.uint64)
            tl.store(prow + start // B + tl.arange(0, NB), packed.to(tl.float64, bitcast=True))
        if n_full < n_loop:
            m_t, s_t, nanf, bmax, bsum = _sample_tile(xrow, n_full + rel, shard, n_real, m_t, s_t, nanf, INV_KAPPA,
                                                      NB, R, L, LOGL, LOGR, True, RAGGED, PRECISE, INTERP)
            packed = (bmax.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | \
                bsum.to(tl.uint32, bitcast=True).to(tl.uint64)
            blk = n_full // B + tl.arange(0, NB)
            tl.store(prow + blk, packed.to(tl.float64, bitcast=True), mask=blk < n_blocks)
    else:
        for start in range(0, n_loop, TILE):
            offs = start + rel
            x = tl.load(xrow + offs, mask=offs < shard, other=float("-inf")).to(tl.float32)
            if RAGGED:
                x = tl.where(offs < n_real, x, float("-inf"))
            if INTERP:
                nanf = tl.maximum(nanf, tl.max((x != x).to(tl.int32), axis=1))
                tmax = tl.max(x, axis=1)
            else:
                tmax = tl.reduce(x, 1, _max_nan)
            m_new = _max_nan(m_t, tmax)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2((m_t - safe) * LOG2E)
            s_t = s_t * alpha + tl.sum(tl.math.exp2(x * LOG2E - (safe * LOG2E)[:, None]), axis=1)
            if EXPECTED:
                alpha_k = tl.math.exp2((m_t - safe) * CK)
                e = tl.math.exp2(x * CK - (safe * CK)[:, None])
                sk_t = sk_t * alpha_k + tl.sum(e, axis=1)
                # -inf ids have e = 0: clamp them so that 0 * x is 0, not NaN
                tk_t = tk_t * alpha_k + tl.sum(e * tl.maximum(x, -3.0e38), axis=1)
            m_t = m_new
    # combine the slots (float64)
    if INTERP:
        m = tl.max(m_t, axis=0)
        m = tl.where(tl.max(nanf, axis=0) > 0, float("nan"), m)
    else:
        m = tl.reduce(m_t, 0, _max_nan)
    msafe = tl.where(m == float("-inf"), 0.0, m)
    if SAMPLE:
        s1 = tl.sum(tl.sum(s_t.to(tl.float64), axis=1) * tl.exp(m_t - msafe).to(tl.float64), axis=0)
    else:
        s1 = tl.sum(s_t.to(tl.float64) * tl.exp(m_t - msafe).to(tl.float64), axis=0)
    label = tl.load(LABEL_COL + row)
    owns = tl.load(OWNS + row) != 0
    xl = tl.load(xrow + label, mask=owns, other=0.0).to(tl.float64)
    tl.store(srow + 0, m.to(tl.float64))
    tl.store(srow + 1, s1)
    tl.store(srow + 2, tl.where(owns, xl, 0.0))
    if EXPECTED:
        sc = tl.exp((m_t - msafe) * INV_KAPPA).to(tl.float64)
        sk = tl.sum(sk_t.to(tl.float64) * sc, axis=0)
        tk = tl.sum(tk_t.to(tl.float64) * sc, axis=0)
        tl.store(srow + 3, sk)
        tl.store(srow + 4, tl.where(sk == 0, 0.0, tk / sk))
    if SAMPLE:
        # epilogue: w_b = bsum_b * exp((bmax_b - m) / kappa) (float64), prefix sums (docs/sampling.md
        # section 3). The prefix row of an ignored row is not written (contract: unspecified).
        m64 = tl.where(m == float("-inf"), 0.0, m.to(tl.float64))
        carry = tl.full([], 0.0, tl.float64)
        if NT > 0:
            for it in tl.static_range(NT):
                carry = _block_prefix(prow, it * NB, n_blocks, bm_all[it], bs_all[it], m64, carry, valid, NB, KAPPA,
                                      PRECISE)
        else:
            tl.debug_barrier()  # the packed pairs were written by other threads of this program
            for e0 in range(0, n_blocks, EPI):
                idx = e0 + tl.arange(0, EPI)
                bits = tl.load(prow + idx, mask=(idx < n_blocks) & valid, other=0.0).to(tl.uint64, bitcast=True)
                bmax = (bits >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                bsum = (bits & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
                tl.debug_barrier()  # every thread has read its pairs before any prefix overwrites them
                carry = _block_prefix(prow, e0, n_blocks, bmax, bsum, m64, carry, valid, EPI, KAPPA, PRECISE)
        tl.store(srow + 3, carry)  # the rank's mass is exactly the last prefix value


# --------------------------------------------------------------------------------------------
# kernel 2: the sampler
# --------------------------------------------------------------------------------------------


@triton.jit
def _seg_combine(c1, n1, l1, c2, n2, l2):
    """Segmented (count, min lane) scan over runs of equal columns (associative on sorted columns)."""
    same = c1 == c2
    return c2, tl.where(same, n1 + n2, n2), tl.where(same, tl.minimum(l1, l2), l2)


@triton.jit(do_not_specialize=["key_mix"])
def _sample_kernel(X, stride_x, KEYS, LABEL_COL, OWNS, OK, TOTAL, CUM, stride_cum, SCALE, PREFIX, stride_p,
                   PARTIAL, stride_part, COLS, stride_c, WTS, stride_w, LANES, stride_l,
                   n_real, n_blocks, key_mix, K, INV_KAPPA: tl.constexpr, BETA: tl.constexpr,
                   RANK: tl.constexpr, TP: tl.constexpr, B: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr,
                   LB: tl.constexpr, NSTEP: tl.constexpr, TAIL: tl.constexpr, LOGT: tl.constexpr, RAGGED: tl.constexpr,
                   MIX_PTR: tl.constexpr, HAS_LANES: tl.constexpr, PRECISE: tl.constexpr):
    # All K lanes at once: uniforms and owners; the owned lanes are sorted by their uniform (owned
    # first), so the expensive part (block search, block recompute) runs over the owned lanes only,
    # KC at a time, and duplicates (the inverse CDF is monotone) are adjacent: merged in registers.
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    prow = PREFIX + row * stride_p
    ok = tl.load(OK + row) != 0
    total = tl.where(ok, tl.load(TOTAL + row), 0.0)
    crow = CUM + row * stride_cum
    c_last = tl.load(crow + TP - 1)
    last_rank = tl.full([], 0, tl.int32)  # first rank whose inclusive sum reaches the total
    for r in tl.static_range(TP):
        last_rank += (tl.load(crow + r) < c_last).to(tl.int32)
    if RANK > 0:
        before = tl.load(crow + RANK - 1)
    else:
        before = tl.full([], 0.0, tl.float64)
    scale = tl.load(SCALE + row)
    label = tl.load(LABEL_COL + row).to(tl.int32)
    owns = tl.load(OWNS + row) != 0
    if MIX_PTR:
        mix = tl.load(key_mix)
    else:
        mix = key_mix
    base = _token_base(tl.load(KEYS + row), mix)
    beta = tl.full([], BETA, tl.float64)  # a bare float constant would be typed fp32
    # 1-2. every lane: uniform, global CDF position, owner
    j = tl.arange(0, KP)
    lane = j < K
    ub = _splitmix64(base + (j + 1).to(tl.uint64) * 0x9E3779B97F4A7C15) >> 11  # 53 random bits
    t = ub.to(tl.float64) * 1.1102230246251565e-16 * total
    owner = tl.zeros([KP], dtype=tl.int32)
    for r in tl.static_range(TP):
        owner += (tl.load(crow + r) <= t).to(tl.int32)
    owner = tl.minimum(owner, last_rank)
    mine = lane & ok & (owner == RANK)
    n_own = tl.sum(mine.to(tl.int32), axis=0)
    tl.store(COLS + row * stride_c + j, tl.full([KP], -1, tl.int32), mask=lane)
    tl.store(WTS + row * stride_w + j, tl.zeros([KP], dtype=tl.float32), mask=lane)
    if HAS_LANES:
        tl.store(LANES + row * stride_l + j, tl.full([KP], -1, tl.int32), mask=lane & ~mine)
    LMASK: tl.constexpr = (1 << LB) - 1
    srt = tl.sort(tl.where(mine, (ub << LB) | j.to(tl.uint64), 0xFFFFFFFFFFFFFFFF))  # owned lanes first
    z_last = tl.load(prow + n_blocks - 1, mask=n_own > 0, other=0.0)
    ib = tl.arange(0, B)
    # column of each sorted position, as [KP // KC, KC]: chunk q of the sorted lanes is row q (a
    # chunk is selected and written back by row index, no gather: tl.gather's local array spills)
    cs_all = tl.full([KP // KC, KC], -1, tl.int32)
    rq = tl.arange(0, KP // KC)[:, None]
    if KC < KP:
        srt2 = tl.reshape(srt, (KP // KC, KC))
    hits = tl.full([], 0.0, tl.float64)
    wsum = tl.full([], 0.0, tl.float64)
    for c0 in range(0, n_own, KC):
        q = c0 + tl.arange(0, KC)
        live = q < n_own
        if KC == KP:
            kq = srt
        else:  # sorted ascending: srt[c0 + i] is row c0 // KC of srt2
            kq = tl.max(tl.where(rq == c0 // KC, srt2, 0), axis=0)
        tq = (kq >> LB).to(tl.float64) * 1.1102230246251565e-16 * total
        # 3. block: min(#{C_b <= t_r}, #{C_b < C_last}) by one branchless binary search; the last
        # accepted and rejected prefix values are the block's bounds (no second gather)
        t_r = tl.maximum((tq - before) / scale, 0.0)
        over = t_r >= z_last
        blk = tl.zeros([KC], dtype=tl.int32)
        c_lo = tl.zeros([KC], dtype=tl.float64)
        c_hi = tl.zeros([KC], dtype=tl.float64)
        for i in tl.static_range(NSTEP - LOGT):
            cand = blk + ((1 << (NSTEP - 1)) >> i)
            inr = live & (cand <= n_blocks)
            v = tl.load(prow + cand - 1, mask=inr, other=float("inf"))
            go = inr & tl.where(over, v < z_last, v <= t_r)
            blk = tl.where(go, cand, blk)
            c_lo = tl.where(go, v, c_lo)
            c_hi = tl.where(inr & ~go, v, c_hi)
        if TAIL > 0:
            # the last LOGT levels (candidates blk + 1 .. blk + TAIL - 1, blk a multiple of TAIL = 4) from
            # one load of the TAIL prefix values C[blk ..]: one whole 32-byte sector, read by 2 lanes (the
            # per-level loads read that sector once per level, and wait for each other). The predicate
            # is monotone in the candidate and the prefix sums do not decrease, so the search's answer
            # is blk + the accepted count, its last accepted value the largest accepted one, its last
            # rejected one (in range) the smallest rejected one. The lanes' inputs are folded into two
            # vectors: a dead lane's candidates start at n_blocks, and the "over" predicate C < C_last
            # is C <= the float64 just below C_last (> 0 where a lane is owned)
            blk = tl.multiple_of(blk, TAIL)
            thr = tl.where(over, (z_last.to(tl.int64, bitcast=True) - 1).to(tl.float64, bitcast=True), t_r)
            jt = tl.arange(0, TAIL)[None, :]
            idx8 = tl.where(live, blk, n_blocks)[:, None] + jt
            in8 = idx8 < n_blocks
            v8 = tl.load(prow + idx8, mask=in8, other=float("inf"))
            cand8 = in8 & (jt < TAIL - 1)
            go8 = cand8 & (v8 <= thr[:, None])
            cnt = tl.sum(go8.to(tl.int32), axis=1)
            lo8 = tl.max(tl.where(go8, v8, float("-inf")), axis=1)
            hi8 = tl.min(tl.where(cand8 & ~go8, v8, float("inf")), axis=1)
            c_lo = tl.where(cnt > 0, lo8, c_lo)
            c_hi = tl.where(hi8 < float("inf"), hi8, c_hi)
            blk = blk + cnt
        blk = tl.minimum(blk, n_blocks - 1)
        # 4. fraction within the block (float64)
        frac = tl.minimum(tl.maximum((t_r - c_lo) / (c_hi - c_lo), 0.0), 1.0)
        # 5. the block's B ids, recomputed in fp32 and searched in float64 (docs/sampling.md step 5)
        offs = blk[:, None] * B + ib[None, :]
        xin = tl.load(xrow + offs, mask=live[:, None], other=float("-inf"))
        xf = xin.to(tl.float32)
        if RAGGED:
            xf = tl.where(offs < n_real, xf, float("-inf"))
        bmax = tl.max(xf, axis=1)
        bsafe = tl.where(bmax == float("-inf"), 0.0, bmax)
        if PRECISE:
            e = libdevice.exp((xf - bsafe[:, None]) * INV_KAPPA)
        else:
            e = tl.exp((xf - bsafe[:, None]) * INV_KAPPA)
        s = tl.cumsum(e.to(tl.float64), axis=1)
        s_last = tl.sum(tl.where(ib[None, :] == B - 1, s, 0.0), axis=1)
        target = frac * s_last
        n_le = tl.sum((s <= target[:, None]).to(tl.int32), axis=1)
        n_lt = tl.sum((s < s_last[:, None]).to(tl.int32), axis=1)
        pos = tl.minimum(tl.minimum(n_le, n_lt), B - 1)
        col = blk * B + pos
        logit = tl.sum(tl.where(ib[None, :] == pos[:, None], xf, 0.0), axis=1).to(tl.float64)
        hit = live & owns & (col == label)
        reward = tl.where(hit, 1.0, beta)
        hits += tl.sum(hit.to(tl.float64), axis=0)
        wsum += tl.sum(tl.where(live, reward * logit, 0.0), axis=0)
        if HAS_LANES:  # every draw in lane order, duplicates kept (return_stats)
            tl.store(LANES + row * stride_l + (kq & LMASK).to(tl.int32), col, mask=live)
        cs_all = tl.where(rq == c0 // KC, tl.where(live, col, -1)[None, :], cs_all)
    # merge duplicates: a run of equal columns ends where the next sorted column differs; its
    # weight (sum of its lanes' -R/K) goes to its lowest lane, the other lanes keep -1 / 0
    cs_all = tl.reshape(cs_all, (KP,))
    pa = tl.arange(0, KP)
    alive = pa < n_own
    ln_all = (srt & LMASK).to(tl.int32)
    nxt = tl.gather(cs_all, tl.minimum(pa + 1, KP - 1), 0)
    is_end = alive & ((pa == n_own - 1) | (cs_all != nxt))
    _, cnt, low = tl.associative_scan((cs_all, tl.full([KP], 1, tl.int32), ln_all), 0, _seg_combine)
    r_end = tl.where(owns & (cs_all == label), 1.0, beta)
    wt = (-r_end * cnt.to(tl.float64) / K).to(tl.float32)
    tl.debug_barrier()  # the -1 / 0 of every lane is written before a run's leader overwrites its lane
    tl.store(COLS + row * stride_c + low, cs_all, mask=is_end)
    tl.store(WTS + row * stride_w + low, wt, mask=is_end)
    tl.store(PARTIAL + row * stride_part, hits)
    tl.store(PARTIAL + row * stride_part + 1, wsum)


@triton.jit(do_not_specialize=["key_mix"])
def _uniforms_kernel(KEYS, OUT, key_mix, K, KP: tl.constexpr, MIX_PTR: tl.constexpr):
    """Test hook: the sampler's uniforms [R, K], to check them against core/random.py bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    if MIX_PTR:
        mix = tl.load(key_mix)
    else:
        mix = key_mix
    base = _token_base(tl.load(KEYS + row), mix)
    tl.store(OUT + row * K + j, _uniforms(base, j), mask=j < K)


# --------------------------------------------------------------------------------------------
# kernel 3: the gradient
# --------------------------------------------------------------------------------------------


@triton.jit
def _grad_kernel(X, stride_x, OUT, stride_o, G, CPI, CQ, COLS, stride_c, WTS, stride_w, VALID, LOCAL, stride_l,
                 n_real, shard, S, INV_KAPPA: tl.constexpr,
                 SP: tl.constexpr, HAS_Q: tl.constexpr, HAS_LOCAL: tl.constexpr, RAGGED: tl.constexpr,
                 NR: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr, GATHER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    orow = OUT + row * stride_o
    valid = tl.load(VALID + row) != 0
    if valid:
        g = tl.load(G + row)
        a = tl.load(CPI + row) * g
        if HAS_Q:
            b = tl.load(CQ + row) * g
        else:
            b = 0.0
        # rank-local normalisers of softmax(x) and softmax(x / kappa)
        if HAS_LOCAL:
            m = tl.load(LOCAL + row * stride_l).to(tl.float32)
            s = tl.load(LOCAL + row * stride_l + 1).to(tl.float32)
            if HAS_Q:
                sk = tl.load(LOCAL + row * stride_l + 3).to(tl.float32)
            else:
                sk = 1.0
        else:  # a first pass, per-thread slots as in the statistics kernel
            LOG2E: tl.constexpr = 1.4426950408889634
            CK: tl.constexpr = INV_KAPPA * 1.4426950408889634
            rel = tl.arange(0, NR)[:, None] * VEC + tl.arange(0, VEC)[None, :]
            m_t = tl.full([NR], float("-inf"), tl.float32)
            s_t = tl.zeros([NR], dtype=tl.float32)
            sk_t = tl.zeros([NR], dtype=tl.float32)
            for start in range(0, n_real, NR * VEC):
                offs = start + rel
                x = tl.load(xrow + offs, mask=offs < shard, other=float("-inf")).to(tl.float32)
                if RAGGED:
                    x = tl.where(offs < n_real, x, float("-inf"))
                m_new = tl.maximum(m_t, tl.max(x, axis=1))
                safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_t = s_t * tl.math.exp2((m_t - safe) * LOG2E) + \
                    tl.sum(tl.math.exp2(x * LOG2E - (safe * LOG2E)[:, None]), axis=1)
                if HAS_Q:
                    sk_t = sk_t * tl.math.exp2((m_t - safe) * CK) + \
                        tl.sum(tl.math.exp2(x * CK - (safe * CK)[:, None]), axis=1)
                m_t = m_new
            m = tl.max(m_t, axis=0)
            ms = tl.where(m == float("-inf"), 0.0, m)
            s = tl.sum(s_t * tl.exp(m_t - ms), axis=0)
            sk = tl.sum(sk_t * tl.exp((m_t - ms) * INV_KAPPA), axis=0)
        msafe = tl.where(m == float("-inf"), 0.0, m)
        inv_s = 1.0 / s
        inv_sk = 1.0 / sk
        # sparse entries (distinct columns: the sampler merged duplicates; one label otherwise): read
        # their logits now, the dense pass may overwrite them in place
        js = tl.arange(0, SP)
        cols = tl.load(COLS + row * stride_c + js, mask=js < S, other=-1)
        act = cols >= 0
        wc = tl.load(WTS + row * stride_w + js, mask=act, other=0.0) * g
        if GATHER:  # picked from the dense tiles as they pass (in registers before they are overwritten)
            xs = tl.zeros([SP], dtype=tl.float32)
        else:
            xs = tl.load(xrow + cols, mask=act, other=0.0).to(tl.float32)
            tl.debug_barrier()
        for start in range(0, shard, TILE):
            offs = start + tl.arange(0, TILE)
            inb = offs < shard
            x = tl.load(xrow + offs, mask=inb, other=float("-inf")).to(tl.float32)
            if GATHER:
                rc = cols - start
                here = act & (rc >= 0) & (rc < TILE)
                xs = tl.where(here, tl.gather(x, tl.minimum(tl.maximum(rc, 0), TILE - 1), 0), xs)
            val = tl.exp(x - msafe) * inv_s * a
            if HAS_Q:
                val += tl.exp((x - msafe) * INV_KAPPA) * inv_sk * b
            if RAGGED:
                val = tl.where(offs < n_real, val, 0.0)
            tl.store(orow + offs, val.to(OUT.dtype.element_ty), mask=inb)
        tl.debug_barrier()  # the dense values of this row are written; now the sparse columns
        fix = tl.exp(xs - msafe) * inv_s * a
        if HAS_Q:
            fix += tl.exp((xs - msafe) * INV_KAPPA) * inv_sk * b
        fix += wc
        tl.store(orow + cols, fix.to(OUT.dtype.element_ty), mask=act)
    else:  # an ignored row: exactly 0, its logits are not read
        for start in range(0, shard, TILE):
            offs = start + tl.arange(0, TILE)
            tl.store(orow + offs, tl.zeros([TILE], dtype=OUT.dtype.element_ty), mask=offs < shard)


# --------------------------------------------------------------------------------------------
# entry points (signatures of core/contract.py)
# --------------------------------------------------------------------------------------------


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton backend needs CUDA logits, got logits on {x.device}; use OTRConfig.backend='torch' (or "
            "'auto'), or set TRITON_INTERPRET=1 before otr_megatron.core.triton_backend is imported to run the "
            "kernels in Triton's interpreter on CPU")


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or (t.size(1) > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must be a 2-D tensor with contiguous rows, got shape {tuple(t.shape)} "
                         f"and strides {t.stride()}")


def _vec_elems(elem_bytes: int) -> int:
    """Elements of one 16-byte vector load."""
    return max(1, 16 // elem_bytes)


def _ragged(spec: Spec) -> bool:
    """The shard holds vocabulary padding: loads stay masked on the shard, n_real via tl.where."""
    return spec.n_real < spec.shard


# "sample" rows of at most NT_MAX tiles whose blocks hold 16 ids per lane (B >= 16) and whose prefix
# rows are 16-byte aligned (n_blocks a multiple of 16) keep their block (bmax, bsum) pairs in registers
# over unrolled tiles (no round trip through memory: 2.5 instead of 3.5 B/elem in the statistics
# kernel); longer rows, B < 16 (8 ids per lane: a tile's float64 scan is amortised over half the ids)
# and unaligned rows (scalar float64 stores per tile: 8 bytes of spills at 64 registers) park them in
# the prefix buffer. On sm_90 SASS (CPU proxies, bf16, B=16, V/tp=32768: NT = 8) the unrolled path
# issues 32.9 instead of 29.6 instructions per element over the whole kernel (one float64 scan per tile
# instead of per 1024 blocks; the streaming part is the same code as the loop), at 64 registers
# (.maxnreg 64, no spills) like the loop. The round trip it saves is mostly L2 traffic (the prefix row
# is rewritten while it is likely still cached) and this kernel is instruction-bound by these counts:
# a GPU launch sweep may set NT_MAX = 0 if the extra instructions cost more than the bytes.
NT_MAX = 8
MAX_REGS = 64  # .maxnreg of the "sample" statistics kernel (without it: 76 at NT = 8, 63-64 otherwise)


LANE_IDS = 16  # ids of a "sample" block per lane: a block of B > 16 ids spans B / 16 lanes


def stats_params(spec: Spec, elem_bytes: int, interpret: bool = INTERPRET) -> dict:
    """Compile-time parameters of the statistics kernel. GPU: 8 warps; "sample": R = B / L lanes per
    block, L = min(B, 16) ids per lane, NB = 256 / R blocks per tile; otherwise each thread 2 x 16
    bytes per iteration. Interpreter: few, large tiles. NT: the tiles of a "sample" row when they are
    unrolled with their pairs in registers, else 0."""
    sample = spec.estimator == "sample"
    vec = _vec_elems(elem_bytes)
    b = spec.block if sample else 1
    lane = min(b, LANE_IDS)
    r = b // lane
    warps = 8
    threads = 32 * warps
    if interpret:
        full = triton.next_power_of_2(max(spec.n_real, 1))
        nb = max(1, min(full, _MAX_TILE) // b) if sample else 1
        nr = max(1, min(full, _MAX_TILE) // vec)
    else:
        nb = max(1, threads // r)
        nr = 2 * threads
    nt = -(-spec.n_blocks // nb)
    # the epilogue's chunk of blocks: 4 per thread, or 1 where the prefix rows (stride n_blocks) are not
    # 16-byte aligned (scalar float64 loads and stores: 4 per thread would take 72 registers)
    epi = min(triton.next_power_of_2(max(spec.n_blocks, 1)), 1024 if spec.n_blocks % 16 == 0 else threads)
    out = dict(SAMPLE=sample, EXPECTED=spec.estimator == "expected", B=b, R=r, L=lane, LOGL=lane.bit_length() - 1,
               LOGR=r.bit_length() - 1, NB=nb, VEC=vec, NR=nr, RAGGED=_ragged(spec), EPI=epi,
               NT=nt if sample and nt <= NT_MAX and lane == LANE_IDS and spec.n_blocks % 16 == 0 else 0,
               PRECISE=not interpret,
               INTERP=interpret, num_warps=warps)
    if sample:
        out["maxnreg"] = MAX_REGS  # a launch option (the interpreter drops it), not a kernel argument
    return out


SEARCH_TAIL = 4  # the sampler's block search ends with one load of 4 prefix values (aligned rows)
MAX_K = 2048  # the sampler packs 53 random bits and the lane index into one 64-bit sort key


def sample_params(spec: Spec, interpret: bool = INTERPRET) -> dict:
    """Compile-time parameters of the sampler: KP >= K lanes at once (uniforms, owners, sort, merge);
    the owned lanes, sorted first, go through the heavy part (block search and recompute) KC at a
    time, so a rank's work there grows with the samples it owns: all K at tp=1, else about twice the
    expected share K / tp (at least 16), with KC * B <= 4096 keeping the [KC, B] block tiles in
    registers. Same rule in the interpreter, so the CPU tests run the chunked path. A chunked
    sampler runs on fewer warps (16 block ids per thread), so a row's total work shrinks too: at tp=8,
    K=256, B=16, 2 warps x 3280 SASS instead of 8 x 2072 (sm_90, static counts)."""
    kp = max(2, triton.next_power_of_2(spec.k))
    share = kp if spec.world == 1 else max(16, triton.next_power_of_2(-(-2 * spec.k // spec.world)))
    kc = min(kp, share, max(16, 4096 // spec.block))
    nstep = spec.n_blocks.bit_length()
    tail = SEARCH_TAIL if nstep >= 4 and spec.n_blocks % 16 == 0 else 0
    return dict(RANK=spec.rank, TP=spec.world, B=spec.block, KP=kp, KC=kc, LB=max(1, (kp - 1).bit_length()),
                NSTEP=nstep, TAIL=tail, LOGT=max(tail.bit_length() - 1, 0), RAGGED=_ragged(spec),
                PRECISE=not interpret,
                num_warps=8 if kc == kp else max(2, min(8, kc * spec.block // 512)))


def grad_params(spec: Spec, elem_bytes: int, s: int, interpret: bool = INTERPRET) -> dict:
    vec = _vec_elems(elem_bytes)
    full = triton.next_power_of_2(max(spec.shard, 1))
    tile = min(full, _MAX_TILE if interpret else 2048)
    nr = max(1, min(full, _MAX_TILE) // vec) if interpret else 512
    sp = triton.next_power_of_2(max(s, 2))
    # GATHER: the sparse logits picked from the dense tiles (a shared-memory gather per tile) instead of
    # S scattered loads (one sector each) before the dense pass; for K-sample lists, not a label
    return dict(SP=sp, RAGGED=_ragged(spec), NR=nr, VEC=vec, TILE=tile, GATHER=sp >= 16, num_warps=8)


def _inv_kappa(spec: Spec) -> float:
    """float32(1 / kappa), as the torch backend."""
    return struct.unpack("<f", struct.pack("<f", 1.0 / spec.kappa))[0]


def _vec(t: torch.Tensor) -> torch.Tensor:
    """A per-row vector as the kernels index it: contiguous (e.g. ``rank_cum[:, -1]`` is a strided
    view), bool as uint8."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _key_mix(key_mix, device):
    """(argument, MIX_PTR): a Python int (signed int64 value of `stream_key`) or a 0-dim int64 tensor
    on the logits' device (a captured call with a device-tensor step); both draw the same samples."""
    if isinstance(key_mix, torch.Tensor):
        if key_mix.dim() != 0 or key_mix.dtype != torch.int64 or key_mix.device != device:
            raise ValueError(f"key_mix must be a Python int or a 0-dim int64 tensor on {device}, got a tensor of "
                             f"shape {tuple(key_mix.shape)}, dtype {key_mix.dtype} on {key_mix.device}")
        return key_mix, True
    if isinstance(key_mix, bool) or not isinstance(key_mix, int) or not -(2**63) <= key_mix < 2**63:
        raise ValueError(f"key_mix must be a signed 64-bit int (core.random.stream_key) or a 0-dim int64 tensor, "
                         f"got {key_mix!r}")
    return key_mix, False


def scratch(rows: int, cols: int, device):
    """The kernels need no workspace."""
    return None


def local_stats(x, label_col, owns_label, valid, spec: Spec, stats_out, prefix_out, scratch=None):
    """Per-rank statistics of a chunk of rows (see `core/contract.py`); rows with ``valid`` False are
    not read (stats -inf, 0, 0, 0, 0) and their prefix row is not written (unspecified: nobody reads it,
    the sampler skips rows with ``ok`` False and ``ok`` implies ``valid``)."""
    rows = x.size(0)
    _check_device(x)
    _check_rows("logits", x)
    if rows == 0:
        return
    if spec.n_real == 0:
        stats_out[:, STAT_MAX] = -math.inf
        stats_out[:, STAT_SUMEXP] = 0.0
        stats_out[:, STAT_LABEL] = 0.0
        if spec.tempered:
            stats_out[:, STAT_TMASS:] = 0.0
        return
    sample = spec.estimator == "sample"
    prefix = prefix_out if sample else stats_out  # a dummy pointer when unused
    if sample:
        _check_rows("prefix_out", prefix_out)
    params = dict(stats_params(spec, x.element_size()))
    if params["NT"] * params["NB"] < spec.n_blocks:  # NB overridden (bench_gpu's sweep): NT unrolled tiles
        params["NT"] = 0  # would not cover the row; park the pairs instead
    LAST_LAUNCH["stats"] = _stats_kernel[(rows,)](
        x, x.stride(0), _vec(label_col), _vec(owns_label), _vec(valid), stats_out, stats_out.stride(0), prefix,
        prefix.stride(0), spec.n_real, spec.shard, spec.n_blocks, INV_KAPPA=_inv_kappa(spec), KAPPA=float(spec.kappa),
        **params)


def sample(x, keys, key_mix, label_col, owns_label, ok, total, rank_cum, rank_scale, prefix, spec: Spec, partial_out,
           cols_out, weights_out, lanes_out=None, scratch=None):
    """Hierarchical inverse-CDF draw of K samples per row (docs/sampling.md section 4). ``cols_out``
    int32: duplicates merged (each owned column once, at the lowest lane that drew it, with the summed
    weight); ``lanes_out`` (optional, int32): every lane's owned column in lane order, else -1."""
    rows = x.size(0)
    _check_device(x)
    mix, mix_ptr = _key_mix(key_mix, x.device)
    if spec.k > MAX_K:
        raise ValueError(f"the Triton sampler draws at most {MAX_K} samples per token, got num_samples={spec.k}; "
                         "use OTRConfig.backend='torch'")
    for name, t in (("cols_out", cols_out), ("lanes_out", lanes_out)):
        if t is not None and t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 (contract v2), got {t.dtype}")
    if rows == 0:
        return
    if spec.n_blocks == 0:  # no real id on this rank: it owns no sample
        partial_out.zero_()
        cols_out.fill_(-1)
        weights_out.zero_()
        if lanes_out is not None:
            lanes_out.fill_(-1)
        return
    for name, t in (("logits", x), ("rank_cum", rank_cum), ("prefix", prefix), ("partial_out", partial_out),
                    ("cols_out", cols_out), ("weights_out", weights_out)):
        _check_rows(name, t)
    lanes = lanes_out if lanes_out is not None else cols_out  # a dummy pointer when unused
    _check_rows("lanes_out", lanes)
    LAST_LAUNCH["sample"] = _sample_kernel[(rows,)](
        x, x.stride(0), _vec(keys), _vec(label_col), _vec(owns_label), _vec(ok), _vec(total), rank_cum,
        rank_cum.stride(0), _vec(rank_scale), prefix, prefix.stride(0), partial_out, partial_out.stride(0),
        cols_out, cols_out.stride(0), weights_out, weights_out.stride(0), lanes, lanes.stride(0),
        spec.n_real, spec.n_blocks, mix, spec.k, INV_KAPPA=_inv_kappa(spec), BETA=float(spec.beta),
        MIX_PTR=mix_ptr, HAS_LANES=lanes_out is not None, **sample_params(spec))


def grad(x, out, g, coef_pi, coef_q, cols, weights, valid, spec: Spec, scratch=None, local=None):
    """Gradient of a chunk of rows (see `core/contract.py`); one rounding to ``out.dtype``. ``cols``
    int32 with no duplicate column in a row (this backend's sampler merges them); rows with ``valid``
    False are exactly 0 and not read.

    local: optional ``[R, >= 4]`` float64 rank-local statistics of these rows (columns STAT_MAX,
    STAT_SUMEXP, STAT_TMASS of `local_stats`, i.e. the forward's own row of the all-gather). With
    them the kernel reads the logits once (4 B/elem in bf16); without, it recomputes the local
    normalisers in a first pass (6 B/elem).
    """
    rows, shard = x.shape
    _check_device(x)
    if rows == 0:
        return
    _check_rows("logits", x)
    _check_rows("out", out)
    _check_rows("cols", cols)
    if cols.dtype != torch.int32:
        raise ValueError(f"cols must be int32 (contract v2), got {cols.dtype}")
    s = cols.size(1)
    has_q = coef_q is not None
    if local is not None and has_q and spec.estimator != "expected":
        local = None  # TMASS is the plain tempered sum only for "expected"
    if spec.n_real == 0:
        out.zero_()
        return
    LAST_LAUNCH["grad"] = _grad_kernel[(rows,)](
        x, x.stride(0), out, out.stride(0), _vec(g), _vec(coef_pi), _vec(coef_q if has_q else coef_pi), cols,
        cols.stride(0), weights, weights.stride(0), _vec(valid), local if local is not None else g,
        local.stride(0) if local is not None else 0,
        spec.n_real, shard, s, INV_KAPPA=_inv_kappa(spec), HAS_Q=has_q, HAS_LOCAL=local is not None,
        **grad_params(spec, x.element_size(), s))


def uniforms_from_key(keys: torch.Tensor, k: int, key_mix) -> torch.Tensor:
    """The sampler's float64 uniforms ``[R, K]`` for a key_mix (int or 0-dim int64 tensor); test hook."""
    out = torch.empty(keys.numel(), k, dtype=torch.float64, device=keys.device)
    mix, mix_ptr = _key_mix(key_mix, keys.device)
    if keys.numel():
        _uniforms_kernel[(keys.numel(),)](keys.reshape(-1).to(torch.int64), out, mix, k,
                                          KP=triton.next_power_of_2(k), MIX_PTR=mix_ptr)
    return out


def uniforms(keys: torch.Tensor, k: int, seed: int, step: int) -> torch.Tensor:
    """The sampler's float64 uniforms ``[R, K]`` (test hook: must equal `core.random.token_uniforms`)."""
    return uniforms_from_key(keys, k, stream_key(seed, step))
