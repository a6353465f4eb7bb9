"""One-Token Rollout over vocab-parallel logits, with no vocabulary-sized communication.

Each tensor-parallel rank holds logits ``[N, V/tp]`` for global ids ``[rank*V/tp, (rank+1)*V/tp)``.
Per token only O(tp) numbers cross ranks, whatever K is:

1. one small all-gather of input fingerprints (shapes, label and key checksums, settings), so a
   mismatched rank raises instead of silently training on wrong numbers;
2. one all-gather of per-rank statistics: max, sum exp at temperature 1 and at kappa, the label's
   logit (owner only), and for the expected estimator the tempered mean logit;
3. (sample only) one all-reduce of the reward-weighted sampled logits and the hit counts.

The backward uses the saved global statistics and needs no collective.

Sampling is an exact hierarchical inverse CDF with one uniform per sample: the uniform is mapped
to a global CDF position, the per-rank masses pick the owning rank (the same decision on every
rank), the owner picks a block of B ids (B ~ sqrt(V/tp / K)) from block masses kept in the forward pass, and
recomputes only that block to find the token. Samples therefore equal a single-device inverse-CDF
draw except where float rounding moves a CDF boundary, and the cost per token is one pass over the
shard plus O(K * B / tp), never K x V.
"""

from __future__ import annotations

import math
import struct
import zlib

import torch
import torch.distributed as dist

from otr_megatron.core.config import OTRConfig
from otr_megatron.core.random import token_uniforms

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)


def _default_chunk_tokens(shard: int, on_gpu: bool) -> int:
    # Elements per fp32 temporary: ~1M (4 MB) keeps a chunk cache-resident on CPU (fastest in the
    # benchmark sweep); GPUs want fewer, larger launches (~16M elements, 64 MB).
    target = 1 << 24 if on_gpu else 1 << 20
    return max(1, target // max(shard, 1))


def _softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ATen's fused softmax over the last dim into a preallocated buffer (cheaper than exp ops)."""
    return torch.ops.aten._softmax.out(x, -1, False, out=out)


def _log_softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._log_softmax.out(x, -1, False, out=out)


class _Workspace:
    """Three fp32 [chunk, V/tp] buffers reused by every chunk of one forward or backward.

    Fresh per-chunk allocations page-fault on CPU (about 20% of the loss time in the benchmark).
    """

    def __init__(self, rows: int, cols: int, device):
        self.bufs = torch.empty(3, rows, cols, dtype=torch.float32, device=device)

    def views(self, x: torch.Tensor):
        """(x as fp32, two scratch buffers): fp32 input is used in place and never written."""
        rows = x.size(0)
        a, b, c = (t[:rows] for t in self.bufs)
        if x.dtype == torch.float32:
            return x, b, c
        a.copy_(x)
        return a, b, c

    def free_after(self, xf: torch.Tensor) -> torch.Tensor:
        """A buffer that may be overwritten once `xf` has been read for the last time."""
        return self.bufs[0][: xf.size(0)]


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


def _fingerprint(labels, keys, vocab_size, ignore_index, cfg, step, shard) -> torch.Tensor:
    n = labels.numel()
    weights = torch.arange(1, n + 1, dtype=torch.int64, device=labels.device)
    bad = _out_of_range(labels, vocab_size, ignore_index)
    head = torch.tensor([n, shard, vocab_size, _settings_id(cfg, step, ignore_index)], dtype=torch.int64, device=labels.device)
    tail = torch.stack([(labels * weights).sum(), (keys * weights).sum(), bad.sum()])
    return torch.cat([head, tail])


def _verify_fingerprints(prints: torch.Tensor, labels, vocab_size, ignore_index) -> None:
    rows = prints.tolist()
    names = ["number of tokens", "logits last dimension", "vocab_size", "OTR settings / step / ignore_index",
             "labels", "token_keys"]
    for field, name in enumerate(names):
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
# the autograd function
# --------------------------------------------------------------------------------------------


class _VocabParallelOTR(torch.autograd.Function):
    """Forward: statistics, sampling and loss. Backward: recompute softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, keys, cfg, group, world, rank, step, vocab_size, ignore_index, stats_out):
        n_tok, shard = logits.shape
        dev = logits.device
        start = rank * shard
        n_real = min(max(vocab_size - start, 0), shard)  # real (unpadded) ids held here
        est = cfg.estimator
        kappa, beta, k = float(cfg.temperature), float(cfg.neg_reward), cfg.num_samples
        tempered = est in ("sample", "expected")
        chunk = cfg.chunk_tokens or _default_chunk_tokens(shard, dev.type == "cuda")

        valid = labels != ignore_index
        local_label = labels - start
        owns_label = valid & (local_label >= 0) & (local_label < n_real)
        label_col = torch.where(owns_label, local_label, torch.zeros_like(local_label))

        # ---- pass 1: per-rank statistics (and block masses of the tempered distribution) ----
        # columns: 0 max m, 1 sum exp(x - m), 2 label logit, 3 sum exp((x - m)/kappa),
        #          4 sum_a q_local(a) x(a), the tempered mean logit (expected estimator only)
        # ATen's fused (log_)softmax kernels cost about one copy, far less than a standalone exp, so
        # the sums are read off them: softmax(x)[argmax] = 1 / sum exp(x - m).
        ncols = 3 + tempered + (est == "expected")
        stats = torch.zeros(n_tok, ncols, dtype=torch.float64, device=dev)
        block = _block_size(n_real, k) if est == "sample" else 1
        n_blocks = -(-n_real // block)
        blocks = torch.zeros(n_tok, n_blocks, dtype=torch.float32, device=dev) if est == "sample" else None
        if n_real == 0:
            stats[:, 0] = -math.inf
        ws = _Workspace(min(chunk, n_tok), n_real, dev) if n_real else None
        for lo in range(0, n_tok if n_real else 0, chunk):
            hi = min(n_tok, lo + chunk)
            xf, buf, q = ws.views(logits[lo:hi, :n_real])
            m, arg = xf.max(dim=-1, keepdim=True)
            _log_softmax(xf, out=buf)
            stats[lo:hi, 0] = m.squeeze(-1)
            stats[lo:hi, 1] = torch.exp(-buf.gather(1, arg)).squeeze(-1)
            if tempered:
                _softmax(torch.mul(xf, 1.0 / kappa, out=buf), out=q)
                mass_local = 1.0 / q.gather(1, arg)  # sum exp((x - m)/kappa)
                stats[lo:hi, 3] = mass_local.squeeze(-1)
                if blocks is not None:
                    full = (n_real // block) * block
                    if full:
                        blocks[lo:hi, : full // block] = q[:, :full].reshape(hi - lo, -1, block).sum(-1)
                    if full < n_real:
                        blocks[lo:hi, -1] = q[:, full:].sum(-1)
                    blocks[lo:hi] *= mass_local  # in units of exp((x - m)/kappa), as the sampler recomputes
                    # the rank's mass must be exactly what the search walks, or every CDF position
                    # shifts by the kernel's summation error (~1e-6: 2% of draws over 32k near-equal ids)
                    stats[lo:hi, 3] = blocks[lo:hi].double().sum(-1)
                if est == "expected":
                    mean = torch.matmul(q.unsqueeze(1), xf.unsqueeze(2)).view(-1)
                    redo = (torch.isnan(mean) & torch.isfinite(m.squeeze(-1))).nonzero().squeeze(1)
                    if redo.numel():  # masked -inf logits: 0 * -inf; a NaN logit still poisons via max
                        xr = xf[redo].clamp(min=torch.finfo(torch.float32).min)
                        mean[redo] = torch.matmul(q[redo].unsqueeze(1), xr.unsqueeze(2)).view(-1)
                    stats[lo:hi, 4] = mean
        rows = torch.arange(n_tok, device=dev)
        stats[:, 2] = torch.where(owns_label, logits[rows, label_col].double(), 0.0)

        # ---- collective: per-rank statistics -> global normalisers, identically on every rank ----
        allstats = _all_gather(stats, group, world)  # [tp, N, ncols]
        m_r = allstats[..., 0]
        big = m_r.amax(0)  # global max (NaN if any rank saw NaN)
        lse = big + torch.log((allstats[..., 1] * torch.exp(m_r - big)).sum(0))
        label_logit = allstats[..., 2].sum(0)
        ok = valid & torch.isfinite(lse)
        if tempered:
            scale = torch.exp((m_r - big) / kappa)  # rank r's tempered mass unit, relative to global max
            mass_r = allstats[..., 3] * scale  # [tp, N]
            mass = mass_r.sum(0)
            lse_k = big / kappa + torch.log(mass)  # log-normaliser of logits / kappa
            ok &= torch.isfinite(lse_k)
            q_label = torch.exp(label_logit / kappa - lse_k)
        label_logprob = label_logit - lse

        # ---- per-token loss and backward coefficients: grad = g * (a*pi + b*q + sparse) ----
        zero = torch.zeros(n_tok, dtype=torch.float64, device=dev)
        coef_q = None
        if est == "sample":
            hits, wsum, sparse = _sample(logits, keys, cfg, step, rank, world, n_real, label_col, owns_label,
                                         ok, m_r, scale, mass_r, mass, blocks, block, group)
            reward = hits + beta * (k - hits)  # S_t
            loss = reward / k * lse - wsum / k
            coef_pi = reward / k
            stats_out["hits"] = hits
            stats_out["owned_samples"] = sparse
            stats_out["reward_mean"] = reward / k
        else:
            if est == "expected":
                # sum_a q(a) l(a): every rank's tempered mean logit, weighted by its mass
                mean_logit = torch.where(mass_r > 0, allstats[..., 4] * mass_r, 0.0).sum(0) / mass
                qy_logp = torch.where(q_label > 0, q_label * label_logprob, zero)
                loss = -((1 - beta) * qy_logp + beta * (mean_logit - lse))
                coef_pi = (1 - beta) * q_label + beta
                coef_label = -(1 - beta) * q_label
                coef_q = torch.full_like(zero, -beta) if beta != 0 else None
            elif est == "sft":
                loss = -label_logprob
                coef_pi = torch.ones_like(zero)
                coef_label = -coef_pi
            else:  # dft: -stopgrad(p_y) * log p_y
                p_label = torch.exp(label_logprob)
                loss = -p_label * label_logprob
                coef_pi = p_label
                coef_label = -p_label
            own = (owns_label & ok).nonzero().squeeze(1)
            sparse = (own, label_col[own], coef_label[own].float())

        # the backward uses this rank's local softmax; its share of the global mass makes it global
        coef_pi = coef_pi * (allstats[rank, :, 1] * torch.exp(m_r[rank] - big)) / torch.exp(lse - big)
        if coef_q is not None:
            coef_q = coef_q * mass_r[rank] / mass
        nan = torch.full_like(zero, math.nan)
        loss = torch.where(ok, loss, torch.where(valid, nan, zero))
        # non-finite logits give a non-finite gradient too; ignored tokens get exactly zero
        coef_pi = torch.where(ok, coef_pi, torch.where(valid, nan, zero)).float()
        if coef_q is not None:
            coef_q = torch.where(ok, coef_q, zero).float()

        stats_out["label_logprob"] = label_logprob.float()
        if tempered:
            stats_out["label_prob_tempered"] = q_label.float()
        stats_out["valid"] = valid

        ctx.save_for_backward(logits)
        ctx.coef_pi, ctx.coef_q, ctx.sparse = coef_pi, coef_q, sparse
        ctx.ignored = (~valid).nonzero().squeeze(1)
        ctx.kappa, ctx.n_real, ctx.chunk, ctx.inplace = kappa, n_real, chunk, cfg.inplace_backward
        return loss.float()

    @staticmethod
    def backward(ctx, grad_loss):
        (logits,) = ctx.saved_tensors
        n_tok, shard = logits.shape
        g = grad_loss.reshape(-1).float()
        a = ctx.coef_pi * g
        b = ctx.coef_q * g if ctx.coef_q is not None else None
        tok, col, coef = ctx.sparse
        vals = coef * g[tok]  # upstream gradient applied in fp32, before any rounding
        out = logits if ctx.inplace else torch.empty_like(logits)
        n_real = ctx.n_real
        if n_real < shard:
            out[:, n_real:] = 0.0  # padded ids: not part of the softmax
        ws = _Workspace(min(ctx.chunk, n_tok), n_real, logits.device) if n_real else None
        for lo in range(0, n_tok if n_real else 0, ctx.chunk):
            hi = min(n_tok, lo + ctx.chunk)
            xf, p, spare = ws.views(logits[lo:hi, :n_real])
            _softmax(xf, out=p).mul_(a[lo:hi, None])  # local softmax x this rank's global share
            if b is not None:
                tempered = torch.mul(xf, 1.0 / ctx.kappa, out=spare)
                q = ws.free_after(xf)  # the upcast copy (or an idle buffer for fp32 input)
                p.addcmul_(_softmax(tempered, out=q), b[lo:hi, None])
            i0, i1 = torch.searchsorted(tok, torch.tensor([lo, hi], device=tok.device)).tolist()
            if i1 > i0:  # scatter-add: duplicate samples accumulate
                p.view(-1).index_add_(0, (tok[i0:i1] - lo) * n_real + col[i0:i1], vals[i0:i1])
            ig = ctx.ignored[(ctx.ignored >= lo) & (ctx.ignored < hi)]
            if ig.numel():
                p.index_fill_(0, ig - lo, 0.0)
            out[lo:hi, :n_real].copy_(p)  # the one rounding to the input dtype
        return out, None, None, None, None, None, None, None, None, None, None


def _block_size(n_real: int, k: int) -> int:
    """Ids per block: balances the per-token block scan (n_real / B) against K in-block scans (K * B)."""
    if n_real <= 0:
        return 4
    return int(min(64, max(4, 2 ** round(0.5 * math.log2(max(n_real / k, 1.0))))))


def _last_positive(rows: torch.Tensor) -> torch.Tensor:
    """Index of the last entry with positive mass in each row (rounding fallback of the searches)."""
    ids = torch.arange(rows.size(-1), device=rows.device)
    return torch.where(rows > 0, ids, 0).amax(-1)


def _sample(logits, keys, cfg, step, rank, world, n_real, label_col, owns_label, ok, m_r, scale, mass_r,
            mass, blocks, block, group):
    """Draw K samples per token; return hit counts, sum_j R_j * logit(a_j) (global) and owned samples."""
    n_tok, shard = logits.shape
    dev = logits.device
    k, kappa, beta = cfg.num_samples, float(cfg.temperature), float(cfg.neg_reward)
    partial = torch.zeros(n_tok, 2, dtype=torch.float64, device=dev)  # hits, sum of R * logit
    toks, cols, weights = [], [], []
    todo = ok.nonzero().squeeze(1)
    ranks = torch.arange(world, device=dev)
    last_rank = torch.where(mass_r > 0, ranks[:, None], 0).amax(0)  # clamp target for rounding
    n_blocks = blocks.size(1)
    in_block = torch.arange(block, device=dev)
    flat = logits.view(-1)
    m_own = m_r[rank].float()
    ragged = n_real % block != 0  # only a rank whose shard ends in padding has a partial last block
    blocked = flat.view(-1, block) if not ragged and shard % block == 0 else None
    # bound the [rows, K, block] and [rows, blocks] temporaries to ~1M elements each
    rows_per_step = max(1, (1 << 20) // max(k * block, n_blocks, 1))
    for s in range(0, todo.numel(), rows_per_step):
        r = todo[s : s + rows_per_step]
        t = token_uniforms(keys[r], k, cfg.seed, step) * mass[r, None]  # global CDF positions [R, K]
        cum = mass_r[:, r].T.cumsum(-1)  # [R, tp]
        owner = torch.minimum(torch.searchsorted(cum, t, right=True), last_rank[r, None])
        mine = owner == rank
        if n_real == 0 or not bool(mine.any()):
            continue
        before = cum[:, rank] - mass_r[rank, r]
        t_local = torch.where(mine, (t - before[:, None]) / scale[rank, r].unsqueeze(1), 0.0).clamp_(min=0.0)
        # level 1: the block, from the block masses kept in pass 1 (float64 prefix sums per token)
        cum_blocks = blocks[r].double().cumsum_(-1)
        blk = torch.searchsorted(cum_blocks, t_local, right=True)
        ri, j = mine.nonzero(as_tuple=True)
        tok = r[ri]
        blk, t_local = blk[ri, j], t_local[ri, j]
        over = blk >= n_blocks  # rounding pushed the target past the last block
        if bool(over.any()):
            blk[over] = _last_positive(blocks[tok[over]])
        t_in = (t_local - torch.where(blk > 0, cum_blocks[ri, (blk - 1).clamp(min=0)], 0.0)).clamp_(min=0.0)
        # level 2: recompute only that block's tempered masses and search them
        base = tok * shard + blk * block
        if blocked is not None:  # blocks are rows of a [N * shard / block, block] view: copy rows
            xb = blocked.index_select(0, base // block)
        else:
            real = (blk * block).unsqueeze(1) + in_block < n_real
            xb = flat[torch.where(real, base.unsqueeze(1) + in_block, (tok * shard).unsqueeze(1))]
        eb = xb.float().sub_(m_own[tok].unsqueeze(1)).mul_(1.0 / kappa).exp_()
        if ragged:
            eb.masked_fill_(~real, 0.0)
        cs = eb.double().cumsum_(-1)
        # rescale to the recomputed block total: the fused kernel's exp and torch.exp differ in the last bits
        t_in = t_in * (cs[:, -1] / blocks[tok, blk].double())
        pos = torch.searchsorted(cs, t_in.unsqueeze(1), right=True).squeeze(1)
        over = pos >= block
        if bool(over.any()):
            pos[over] = _last_positive(eb[over])
        col = blk * block + pos
        hit = owns_label[tok] & (col == label_col[tok])
        w = torch.where(hit, 1.0, beta)
        partial[:, 0].index_add_(0, tok, hit.double())
        partial[:, 1].index_add_(0, tok, w * flat[base + pos].double())
        toks.append(tok)
        cols.append(col)
        weights.append((-w / k).float())
    if group is not None:
        dist.all_reduce(partial, group=group)
    if toks:
        sparse = (torch.cat(toks), torch.cat(cols), torch.cat(weights))
    else:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        sparse = (empty, empty, torch.zeros(0, dtype=torch.float32, device=dev))
    return partial[:, 0], partial[:, 1], sparse


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

    stats: dict = {}
    loss = _VocabParallelOTR.apply(flat_logits, flat_labels, keys, cfg, tp_group, world, rank, step, vocab_size,
                                   ignore_index, stats)
    loss = loss.view(shape)
    if not return_stats:
        return loss
    out = {}
    valid = stats["valid"]
    sparse = stats.pop("owned_samples", None)
    for name, value in stats.items():
        if value.is_floating_point():
            value = torch.where(valid, value, torch.zeros_like(value))
        if name == "hits":
            value = value.round().to(torch.int64)
        elif value.dtype == torch.float64:
            value = value.float()
        out[name] = value.view(shape)
    if sparse is not None:
        # this rank's draws, one entry per sample (duplicates repeated): (flat token index, global id)
        out["owned_samples"] = (sparse[0], sparse[1] + rank * shard)
    return loss, out
