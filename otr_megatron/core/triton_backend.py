"""Fused Triton kernels for the three compute steps of the OTR loss (the "triton" backend).

Same entry points, shapes, units and arithmetic as the reference `core/torch_backend.py`
(contract: `core/contract.py`; sampling: docs/sampling.md), in three kernels whose grid is one
program per row (token):

- `local_stats`: one read of the row. Online max (with an explicit NaN flag: `tl.max` drops NaN,
  `torch.max` does not), sum exp(x - m), for "expected" the tempered sum and mean, the label logit;
  for "sample" the per-block (bmax, bsum) pairs, parked bit-packed in the float64 prefix buffer
  until the row max is known, then an epilogue turns them into the float64 block weights and
  prefix sums in place (no extra memory).
- `sample`: K lanes per row. SplitMix64 uniforms computed in the kernel (bit-exact with
  `core/random.py`), owner rank by compare, block by binary search over the prefix sums, then
  the one block of B ids recomputed and searched (docs/sampling.md section 4, step 5's rescale).
- `grad`: dense g * (coef_pi * softmax(x) [+ coef_q * softmax(x / kappa)]) written once, then,
  after a CTA barrier, the sparse entries of the row rewritten with their duplicates merged in
  registers (no atomics); the logits at those columns are read before the dense pass, so it
  works in place. One rounding to the output dtype; ignored rows and padded columns exact 0.

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
def _stats_kernel(X, stride_x, LABEL_COL, OWNS, STATS, stride_s, PREFIX, stride_p,
                  n_real, n_blocks, INV_KAPPA: tl.constexpr, KAPPA: tl.constexpr,
                  SAMPLE: tl.constexpr, EXPECTED: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr,
                  TILE: tl.constexpr, EPI: tl.constexpr, PRECISE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    srow = STATS + row * stride_s
    m = tl.full([], float("-inf"), tl.float32)
    s1 = tl.full([], 0.0, tl.float64)  # sum exp(x - m)
    sk = tl.full([], 0.0, tl.float64)  # sum exp((x - m) * INV_KAPPA)   (expected)
    tk = tl.full([], 0.0, tl.float64)  # sum exp((x - m) * INV_KAPPA) * x
    nan = tl.full([], 0, tl.int32)
    TB: tl.constexpr = TILE // B
    for start in range(0, n_real, TILE):
        if SAMPLE:
            offs = start + tl.arange(0, TB)[:, None] * B + tl.arange(0, B)[None, :]
        else:
            offs = start + tl.arange(0, TILE)
        inb = offs < n_real
        x = tl.load(xrow + offs, mask=inb, other=float("-inf")).to(tl.float32)
        isnan = x != x
        xm = tl.where(isnan, float("-inf"), x)  # NaN is tracked by the flag; max over the rest
        if SAMPLE:
            bmax = tl.max(xm, axis=1)
            nan = tl.maximum(nan, tl.max(tl.max(isnan.to(tl.int32), axis=1), axis=0))
            m_new = tl.maximum(m, tl.max(bmax, axis=0))
        else:
            nan = tl.maximum(nan, tl.max(isnan.to(tl.int32), axis=0))
            m_new = tl.maximum(m, tl.max(xm, axis=0))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - safe).to(tl.float64)  # 0 on the first tile; exp(-inf - 0) = 0
        p = tl.exp(x - safe)  # padded / -inf: 0; NaN stays NaN
        if SAMPLE:
            s1 = s1 * alpha + tl.sum(tl.sum(p, axis=1), axis=0).to(tl.float64)
        else:
            s1 = s1 * alpha + tl.sum(p, axis=0).to(tl.float64)
        if EXPECTED:
            alpha_k = tl.exp((m - safe) * INV_KAPPA).to(tl.float64)
            e = tl.exp((x - safe) * INV_KAPPA)
            sk = sk * alpha_k + tl.sum(e, axis=0).to(tl.float64)
            tk = tk * alpha_k + tl.sum(e * tl.where(e > 0, x, 0.0), axis=0).to(tl.float64)  # 0 * -inf = 0
        if SAMPLE:
            # per block of B real ids: bmax (fp32) and bsum = pairwise-tree fp32 sum of
            # exp((x - bmax) * INV_KAPPA); parked bit-packed until the row max is known
            bsafe = tl.where(bmax == float("-inf"), 0.0, bmax)
            if PRECISE:  # libdevice's expf: the function torch's CUDA exp calls (bit-equal block sums)
                e = libdevice.exp((x - bsafe[:, None]) * INV_KAPPA)
            else:
                e = tl.exp((x - bsafe[:, None]) * INV_KAPPA)
            for lvl in tl.static_range(LOG2B):
                e = tl.sum(tl.reshape(e, (TB, 2, B >> (lvl + 1))), axis=1)  # e[i] + e[i + width]
            bsum = tl.reshape(e, (TB,))
            packed = (bmax.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | \
                bsum.to(tl.uint32, bitcast=True).to(tl.uint64)
            blk = start // B + tl.arange(0, TB)
            tl.store(PREFIX + row * stride_p + blk, packed.to(tl.float64, bitcast=True), mask=blk < n_blocks)
        m = m_new
    m = tl.where(nan > 0, float("nan"), m)
    label = tl.load(LABEL_COL + row)
    owns = tl.load(OWNS + row) != 0
    xl = tl.load(xrow + label, mask=owns, other=0.0).to(tl.float64)
    tl.store(srow + 0, m.to(tl.float64))
    tl.store(srow + 1, s1)
    tl.store(srow + 2, tl.where(owns, xl, 0.0))
    if EXPECTED:
        tl.store(srow + 3, sk)
        tl.store(srow + 4, tl.where(sk == 0, 0.0, tk / sk))
    if SAMPLE:
        # epilogue: w_b = bsum_b * exp((bmax_b - m) / kappa) (float64), prefix sums in place;
        # the running total is added to the first element before each chunk's scan, so the
        # interpreter (a sequential scan) reproduces torch's sequential float64 cumsum exactly
        tl.debug_barrier()  # the packed pairs were written by other threads of this program
        m64 = tl.where(m == float("-inf"), 0.0, m.to(tl.float64))
        kappa = tl.full([], KAPPA, tl.float64)  # a bare float constant would be typed fp32
        carry = tl.full([], 0.0, tl.float64)
        prow = PREFIX + row * stride_p
        for e0 in range(0, n_blocks, EPI):
            idx = e0 + tl.arange(0, EPI)
            inb = idx < n_blocks
            bits = tl.load(prow + idx, mask=inb, other=0.0).to(tl.uint64, bitcast=True)
            bmax = (bits >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
            bsum = (bits & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
            if PRECISE:
                w = libdevice.exp((bmax.to(tl.float64) - m64) / kappa) * bsum.to(tl.float64)
            else:
                w = tl.exp((bmax.to(tl.float64) - m64) / kappa) * bsum.to(tl.float64)
            w = tl.where(inb, w, 0.0)
            w = tl.where(idx == e0, w + carry, w)
            c = tl.cumsum(w, axis=0)
            tl.debug_barrier()  # every thread has read its pairs before any prefix overwrites them
            tl.store(prow + idx, c, mask=inb)
            carry = tl.sum(tl.where(idx == tl.minimum(e0 + EPI, n_blocks) - 1, c, 0.0), axis=0)
        tl.store(srow + 3, carry)  # the rank's mass is exactly the last prefix value


# --------------------------------------------------------------------------------------------
# kernel 2: the sampler
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["key_mix"])
def _sample_kernel(X, stride_x, KEYS, LABEL_COL, OWNS, OK, TOTAL, CUM, stride_cum, SCALE, PREFIX, stride_p,
                   PARTIAL, stride_part, COLS, stride_c, WTS, stride_w,
                   n_real, n_blocks, key_mix, KEY_MIX, K, INV_KAPPA: tl.constexpr, BETA: tl.constexpr,
                   RANK: tl.constexpr, TP: tl.constexpr, B: tl.constexpr, KC: tl.constexpr,
                   NSTEP: tl.constexpr, PRECISE: tl.constexpr, KEY_FROM_PTR: tl.constexpr):
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
    z_last = tl.load(prow + n_blocks - 1)
    label = tl.load(LABEL_COL + row)
    owns = tl.load(OWNS + row) != 0
    if KEY_FROM_PTR:
        base = _token_base(tl.load(KEYS + row), tl.load(KEY_MIX))
    else:
        base = _token_base(tl.load(KEYS + row), key_mix)
    ib = tl.arange(0, B)
    beta = tl.full([], BETA, tl.float64)  # a bare float constant would be typed fp32
    hits = tl.full([], 0.0, tl.float64)
    wsum = tl.full([], 0.0, tl.float64)
    for k0 in range(0, K, KC):
        j = k0 + tl.arange(0, KC)
        lane = j < K
        t = _uniforms(base, j) * total  # global CDF position
        owner = tl.zeros([KC], dtype=tl.int32)
        for r in tl.static_range(TP):
            owner += (tl.load(crow + r) <= t).to(tl.int32)
        owner = tl.minimum(owner, last_rank)
        mine = lane & ok & (owner == RANK)
        t_r = tl.maximum((t - before) / scale, 0.0)
        # block: min(#{C_b <= t_r}, #{C_b < C_last}) by one branchless binary search
        over = t_r >= z_last
        blk = tl.zeros([KC], dtype=tl.int32)
        for i in tl.static_range(NSTEP):
            cand = blk + ((1 << (NSTEP - 1)) >> i)
            live = mine & (cand <= n_blocks)
            v = tl.load(prow + cand - 1, mask=live, other=float("inf"))
            go = live & tl.where(over, v < z_last, v <= t_r)
            blk = tl.where(go, cand, blk)
        blk = tl.minimum(blk, n_blocks - 1)
        c_hi = tl.load(prow + blk, mask=mine, other=1.0)
        c_lo = tl.load(prow + blk - 1, mask=mine & (blk > 0), other=0.0)
        frac = tl.minimum(tl.maximum((t_r - c_lo) / (c_hi - c_lo), 0.0), 1.0)
        # the block's B ids, recomputed in fp32 and searched in float64 (docs/sampling.md step 5)
        offs = blk[:, None] * B + ib[None, :]
        xin = tl.load(xrow + offs, mask=mine[:, None] & (offs < n_real), other=float("-inf"))
        xf = xin.to(tl.float32)
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
        col = blk.to(tl.int64) * B + pos
        logit = tl.sum(tl.where(ib[None, :] == pos[:, None], xin.to(tl.float64), 0.0), axis=1)
        hit = mine & owns & (col == label)
        reward = tl.where(hit, 1.0, beta)
        hits += tl.sum(hit.to(tl.float64), axis=0)
        wsum += tl.sum(tl.where(mine, reward * logit, 0.0), axis=0)
        tl.store(COLS + row * stride_c + j, tl.where(mine, col, -1), mask=lane)
        tl.store(WTS + row * stride_w + j, tl.where(mine, -reward / K, 0.0).to(tl.float32), mask=lane)
    tl.store(PARTIAL + row * stride_part, hits)
    tl.store(PARTIAL + row * stride_part + 1, wsum)


@triton.jit(do_not_specialize=["key_mix"])
def _uniforms_kernel(KEYS, OUT, key_mix, K, KP: tl.constexpr):
    """Test hook: the sampler's uniforms [R, K], to check them against core/random.py bit for bit."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    base = _token_base(tl.load(KEYS + row), key_mix)
    tl.store(OUT + row * K + j, _uniforms(base, j), mask=j < K)


# --------------------------------------------------------------------------------------------
# kernel 3: the gradient
# --------------------------------------------------------------------------------------------


@triton.jit
def _grad_kernel(X, stride_x, OUT, stride_o, G, CPI, CQ, COLS, stride_c, WTS, stride_w, VALID, LOCAL, stride_l,
                 n_real, shard, S, INV_KAPPA: tl.constexpr,
                 SP: tl.constexpr, MC: tl.constexpr, HAS_Q: tl.constexpr, HAS_LOCAL: tl.constexpr,
                 TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    orow = OUT + row * stride_o
    valid = tl.load(VALID + row) != 0
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
    else:
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        sk = tl.full([], 0.0, tl.float32)
        for start in range(0, n_real, TILE):
            offs = start + tl.arange(0, TILE)
            x = tl.load(xrow + offs, mask=offs < n_real, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(tl.where(x != x, float("-inf"), x), axis=0))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), axis=0)
            if HAS_Q:
                sk = sk * tl.exp((m - safe) * INV_KAPPA) + tl.sum(tl.exp((x - safe) * INV_KAPPA), axis=0)
            m = m_new
    msafe = tl.where(m == float("-inf"), 0.0, m)
    inv_s = 1.0 / s
    inv_sk = 1.0 / sk
    # sparse entries: read their logits now (the dense pass may overwrite them in place) and merge
    # duplicates per row in registers, comparing against the list in chunks of MC lanes
    js = tl.arange(0, SP)
    cols = tl.load(COLS + row * stride_c + js, mask=js < S, other=-1)
    act = (cols >= 0) & valid
    merged = tl.zeros([SP], dtype=tl.float32)
    for c0 in tl.static_range(0, SP, MC):
        jc = c0 + tl.arange(0, MC)
        cc = tl.load(COLS + row * stride_c + jc, mask=jc < S, other=-1)
        wc = tl.load(WTS + row * stride_w + jc, mask=(jc < S) & (cc >= 0), other=0.0) * g
        merged += tl.sum(tl.where(cols[:, None] == cc[None, :], wc[None, :], 0.0), axis=1)
    xs = tl.load(xrow + cols, mask=act, other=0.0).to(tl.float32)
    tl.debug_barrier()
    for start in range(0, shard, TILE):
        offs = start + tl.arange(0, TILE)
        real = offs < n_real
        x = tl.load(xrow + offs, mask=real, other=float("-inf")).to(tl.float32)
        val = tl.exp(x - msafe) * inv_s * a
        if HAS_Q:
            val += tl.exp((x - msafe) * INV_KAPPA) * inv_sk * b
        val = tl.where(real & valid, val, 0.0)
        tl.store(orow + offs, val.to(OUT.dtype.element_ty), mask=offs < shard)
    tl.debug_barrier()  # the dense values of this row are written; now the sparse columns
    fix = tl.exp(xs - msafe) * inv_s * a
    if HAS_Q:
        fix += tl.exp((xs - msafe) * INV_KAPPA) * inv_sk * b
    fix += merged
    tl.store(orow + cols, fix.to(OUT.dtype.element_ty), mask=act)


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


def _tile(cols: int, gpu_elems: int, interpret: bool) -> int:
    """Elements per tile: few, large tiles in the interpreter; on a GPU a size that keeps the
    kernel near 80-110 registers at 8 warps (2-3 CTAs per SM; sm_90 numbers from triton_aot)."""
    full = triton.next_power_of_2(max(cols, 1))
    return min(full, _MAX_TILE if interpret else gpu_elems)


def stats_params(spec: Spec, elem_bytes: int, interpret: bool = INTERPRET) -> dict:
    """Compile-time parameters of the statistics kernel for this call."""
    sample = spec.estimator == "sample"
    b = spec.block if sample else 1
    if sample:  # the [TILE / B, B] tile and its pairwise tree: ~80 registers at these sizes
        gpu = 4096 if b <= 16 else 2048
    else:
        gpu = 16384 // elem_bytes
    return dict(SAMPLE=sample, EXPECTED=spec.estimator == "expected", B=b, LOG2B=b.bit_length() - 1,
                TILE=max(_tile(spec.n_real, gpu, interpret), b),
                EPI=min(triton.next_power_of_2(max(spec.n_blocks, 1)), 1024), PRECISE=not interpret, num_warps=8)


def sample_params(spec: Spec, interpret: bool = INTERPRET) -> dict:
    """Compile-time parameters of the sampler: KC lanes per step (all K in the interpreter; on a
    GPU KC * B <= 1024 keeps the [KC, B] block tiles near 80-95 registers at 8 warps)."""
    kc = triton.next_power_of_2(spec.k)
    if not interpret:
        kc = min(kc, max(16, 1024 // spec.block))
    return dict(RANK=spec.rank, TP=spec.world, B=spec.block, KC=kc, NSTEP=spec.n_blocks.bit_length(),
                PRECISE=not interpret, num_warps=8)


def grad_params(shard: int, elem_bytes: int, s: int, interpret: bool = INTERPRET) -> dict:
    sp = triton.next_power_of_2(max(s, 2))
    return dict(SP=sp, MC=min(sp, 32), TILE=_tile(shard, 8192 // elem_bytes, interpret), num_warps=8)


def _inv_kappa(spec: Spec) -> float:
    """float32(1 / kappa), as the torch backend."""
    return struct.unpack("<f", struct.pack("<f", 1.0 / spec.kappa))[0]


def _vec(t: torch.Tensor) -> torch.Tensor:
    """A per-row vector as the kernels index it: contiguous (e.g. ``rank_cum[:, -1]`` is a strided
    view), bool as uint8."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def scratch(rows: int, cols: int, device):
    """The kernels need no workspace."""
    return None


def local_stats(x, label_col, owns_label, valid, spec: Spec, stats_out, prefix_out, scratch=None):
    """Per-rank statistics of a chunk of rows (see `core/contract.py`)."""
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
    LAST_LAUNCH["stats"] = _stats_kernel[(rows,)](
        x, x.stride(0), _vec(label_col), _vec(owns_label), stats_out, stats_out.stride(0), prefix, prefix.stride(0),
        spec.n_real, spec.n_blocks, INV_KAPPA=_inv_kappa(spec), KAPPA=float(spec.kappa),
        **stats_params(spec, x.element_size()))


def sample(x, keys, key_mix, label_col, owns_label, ok, total, rank_cum, rank_scale, prefix, spec: Spec, partial_out,
           cols_out, weights_out, lanes_out=None, scratch=None):
    """Hierarchical inverse-CDF draw of K samples per row (docs/sampling.md section 4)."""
    rows = x.size(0)
    _check_device(x)
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
    LAST_LAUNCH["sample"] = _sample_kernel[(rows,)](
        x, x.stride(0), _vec(keys), _vec(label_col), _vec(owns_label), _vec(ok), _vec(total), rank_cum,
        rank_cum.stride(0), _vec(rank_scale), prefix, prefix.stride(0), partial_out, partial_out.stride(0),
        cols_out, cols_out.stride(0), weights_out, weights_out.stride(0),
        spec.n_real, spec.n_blocks, key_mix if not torch.is_tensor(key_mix) else 0,
        key_mix if torch.is_tensor(key_mix) else keys, spec.k,
        INV_KAPPA=_inv_kappa(spec), BETA=float(spec.beta), KEY_FROM_PTR=torch.is_tensor(key_mix),
        **sample_params(spec))
    if lanes_out is not None:  # this shim's sampler does not merge duplicates: cols are the lanes
        lanes_out.copy_(cols_out)


def grad(x, out, g, coef_pi, coef_q, cols, weights, valid, spec: Spec, scratch=None, local=None):
    """Gradient of a chunk of rows (see `core/contract.py`); one rounding to ``out.dtype``.

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
    s = cols.size(1)
    has_q = coef_q is not None
    if local is not None and has_q and spec.estimator != "expected":
        local = None  # TMASS is the plain tempered sum only for "expected"
    LAST_LAUNCH["grad"] = _grad_kernel[(rows,)](
        x, x.stride(0), out, out.stride(0), _vec(g), _vec(coef_pi), _vec(coef_q if has_q else coef_pi), cols,
        cols.stride(0), weights, weights.stride(0), _vec(valid), local if local is not None else g,
        local.stride(0) if local is not None else 0,
        spec.n_real, shard, s, INV_KAPPA=_inv_kappa(spec), HAS_Q=has_q, HAS_LOCAL=local is not None,
        **grad_params(shard, x.element_size(), s))


def uniforms(keys: torch.Tensor, k: int, seed: int, step: int) -> torch.Tensor:
    """The sampler's float64 uniforms ``[R, K]`` (test hook: must equal `core.random.token_uniforms`)."""
    out = torch.empty(keys.numel(), k, dtype=torch.float64, device=keys.device)
    if keys.numel():
        _uniforms_kernel[(keys.numel(),)](keys.reshape(-1).to(torch.int64), out, stream_key(seed, step), k,
                                          KP=triton.next_power_of_2(k))
    return out
