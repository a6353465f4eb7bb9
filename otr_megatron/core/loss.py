"""One-Token Rollout over vocab-parallel logits, with no vocabulary-sized communication.

Each tensor-parallel rank holds logits ``[N, V/tp]`` for global ids ``[rank*V/tp, (rank+1)*V/tp)``.
The forward is a sequence of named steps (Megatron's shape); what touches the logits is a backend's
(`core/contract.py`: torch reference, Triton kernels), and so is the small per-token glue around it
(`Backend.combine`); the collectives are all visible here:

0. `prologue` (combine): label columns, the call's random key and a small fingerprint of the inputs,
   all-gathered and checked without a blocking host sync (`core/checks.py`), so a mismatched rank or
   an out-of-range label raises instead of silently training on wrong numbers;
1. `local_statistics`: per rank and token, max, sum exp at temperature 1, the label's logit (owner
   only), the tempered mass at kappa (and, for the expected estimator, the tempered mean logit;
   for the sampled one, the float64 prefix sums of the block weights of docs/sampling.md);
2. one all-gather of those statistics (3-5 numbers per token);
3. `normalise` (combine, sample only): logsumexp at kappa, per-rank masses, this rank's scale;
4. `draw_samples` (sample only): the layout-exact hierarchical inverse CDF, then one all-reduce of
   hit counts and reward-weighted sampled logits (2 numbers per token);
5. `finish` (combine): per-token loss and the gradient coefficients of each estimator.

The backward is one step per chunk (`grad`): dense ``a * softmax(x) [+ b * softmax(x / kappa)]`` plus
the sparse sampled (or label) entries, from the saved per-token coefficients, with no collective.
Only O(tp) numbers per token cross ranks, whatever K is. By default nothing blocks on the device and
every shape is static, so forward + backward can be captured in a CUDA graph (``step`` may then be a
0-dim int64 device tensor); ``return_stats=True`` compacts the drawn samples (one host sync).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from otr_megatron.core import checks
from otr_megatron.core.backends import get_backend
from otr_megatron.core.config import OTRConfig
from otr_megatron.core.contract import FP_COMPARED, Backend, Normalisers, Prologue, Spec, block_size
from otr_megatron.core.torch_combine import Terms, estimator_terms, global_normalisers, label_columns

__all__ = ["vocab_parallel_otr_loss", "make_spec", "label_columns", "local_statistics", "global_normalisers",
           "draw_samples", "estimator_terms", "Normalisers", "Terms", "check_pending"]


def _default_chunk_tokens(shard: int, on_gpu: bool) -> int:
    # Elements per fp32 temporary: ~1M (4 MB) keeps a chunk cache-resident on CPU (fastest in the
    # benchmark sweep); GPUs want fewer, larger launches (~16M elements, 64 MB).
    target = 1 << 24 if on_gpu else 1 << 20
    return max(1, target // max(shard, 1))


def _tp_layout(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _settings_id(cfg: OTRConfig, ignore_index: int) -> int:
    """Deterministic id of the host-side settings that must agree across TP ranks (Python's hash() is
    salted). The step is a fingerprint field of its own (it may be a device tensor)."""
    raw = struct.pack("<qdd", cfg.num_samples, cfg.temperature, cfg.neg_reward)
    raw += f"{cfg.estimator}|{cfg.seed}|{ignore_index}".encode()
    return zlib.crc32(raw)


# --------------------------------------------------------------------------------------------
# argument checks (host-side facts only: shapes, dtypes, devices, settings)
# --------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)
_STEP_LIMIT = 1 << 63  # the step enters the key as an int64


def _check_step(step, device) -> None:
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.dtype != torch.int64 or step.device != device:
            raise ValueError(f"step as a tensor must be a 0-dim int64 tensor on the logits' device {device}, got "
                             f"shape {tuple(step.shape)}, {step.dtype} on {step.device}")
        return
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < _STEP_LIMIT:
        raise ValueError(f"step must be an integer in [0, 2**63) (the training iteration) or a 0-dim int64 tensor "
                         f"on the logits' device, got {step!r}")


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOAT_DTYPES:
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be a bf16, fp16, fp32 or fp64 tensor, got {got}")
    if logits.dim() < 1 or logits.size(-1) < 1:
        raise ValueError(f"logits must have shape [..., V/tp] with V/tp >= 1, got {tuple(logits.shape)}")


def _check_args(shard, lead_shape, device, tokens_in, labels, cfg, token_keys, vocab_size, padded_vocab_size,
                step, world):
    """The checks every entry point shares; ``lead_shape`` is the token shape of ``tokens_in``."""
    if not isinstance(cfg, OTRConfig):
        raise TypeError(f"cfg must be an otr_megatron.OTRConfig, got {type(cfg).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 (or int32) tensor of token ids, got {got}")
    if tuple(labels.shape) != tuple(lead_shape):
        what = "logits shape without its last dimension" if tokens_in == "logits" else tokens_in
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {what} {tuple(lead_shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {tokens_in.split()[0]} on {device}")
    if token_keys is not None:
        if not isinstance(token_keys, torch.Tensor) or token_keys.dtype not in _INT_DTYPES:
            got = token_keys.dtype if isinstance(token_keys, torch.Tensor) else type(token_keys).__name__
            raise TypeError(f"token_keys must be an int64 tensor like labels, got {got}")
        if tuple(token_keys.shape) != tuple(labels.shape):
            raise ValueError(f"token_keys shape {tuple(token_keys.shape)} must equal labels shape {tuple(labels.shape)}")
        if token_keys.device != device:
            raise ValueError(f"token_keys are on {token_keys.device} but {tokens_in.split()[0]} on {device}")
    _check_step(step, device)
    if padded_vocab_size is not None and shard * world != padded_vocab_size:
        got = "logits last dimension" if tokens_in == "logits" else "weight rows"
        raise ValueError(
            f"{got} {shard} x tensor-parallel size {world} = {shard * world} does not match "
            f"padded_vocab_size={padded_vocab_size}; pass this rank's vocabulary shard, not the gathered vocabulary"
        )
    if vocab_size is None:
        vocab_size = shard * world
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= shard * world:
        what = "logits.size(-1)" if tokens_in == "logits" else "weight.size(0)"
        raise ValueError(
            f"vocab_size must be an integer in [1, {what} * tp = {shard * world}], got {vocab_size!r}"
        )
    return vocab_size


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    if group is None:
        return t.unsqueeze(0)
    out = torch.empty((world * t.size(0),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out.view((world,) + tuple(t.shape))


# --------------------------------------------------------------------------------------------
# the forward's steps (each usable on its own: tests run them for simulated ranks)
# --------------------------------------------------------------------------------------------


def make_spec(cfg: OTRConfig, rank: int, world: int, shard: int, vocab_size: int) -> Spec:
    """Static settings of a call on one rank (the same for every step)."""
    n_real = min(max(vocab_size - rank * shard, 0), shard)  # real (unpadded) ids held here
    block = block_size(vocab_size, cfg.num_samples, shard) if cfg.estimator == "sample" else 1
    return Spec(cfg.estimator, float(cfg.temperature), float(cfg.neg_reward), cfg.num_samples, cfg.seed,
                rank, world, shard, n_real, block)


def _chunks(n_tok: int, chunk: int):
    """Row ranges of the chunks; None for one chunk of every row (no slicing: fewer host ops)."""
    if 0 < n_tok <= chunk:
        return None
    return [(lo, min(n_tok, lo + chunk)) for lo in range(0, n_tok, chunk)]  # [] for no rows: nothing to do


def local_statistics(backend: Backend, spec: Spec, logits, label_col, owns_label, chunk: int, valid=None, scratch=None):
    """Step 1: this rank's statistics, chunk by chunk. Returns (stats [N, C] float64, prefix
    [N, n_blocks] float64 or None), see `core/contract.py`."""
    n_tok = logits.size(0)
    if valid is None:
        valid = torch.ones_like(owns_label)
    stats = torch.empty(n_tok, spec.stat_columns, dtype=torch.float64, device=logits.device)
    prefix = (torch.empty(n_tok, spec.n_blocks, dtype=torch.float64, device=logits.device)
              if spec.estimator == "sample" else None)
    if scratch is None:
        scratch = backend.scratch(min(chunk, n_tok), spec.n_real, logits.device)
    parts = _chunks(n_tok, chunk)
    if parts is None:
        backend.local_stats(logits, label_col, owns_label, valid, spec, stats, prefix, scratch)
    for lo, hi in parts or ():
        backend.local_stats(logits[lo:hi], label_col[lo:hi], owns_label[lo:hi], valid[lo:hi], spec, stats[lo:hi],
                            prefix[lo:hi] if prefix is not None else None, scratch)
    return stats, prefix


def draw_samples(backend: Backend, spec: Spec, logits, keys, label_col, owns_label, norms: Normalisers, prefix,
                 key_mix, lanes_out=None):
    """Step 4 (no collective): this rank's part of the K samples per token. Returns (partial [N, 2]
    float64 hits and sum_j R_j x[a_j] over this rank's samples, cols [N, K] int32 (-1 = not this
    rank's; duplicates possibly merged), weights [N, K] float32 = -R_j / K). ``lanes_out``: optional
    [N, K] int32, filled with every lane's draw (duplicates kept)."""
    n_tok = logits.size(0)
    dev = logits.device
    partial = torch.empty(n_tok, 2, dtype=torch.float64, device=dev)
    cols = torch.empty(n_tok, spec.k, dtype=torch.int32, device=dev)
    weights = torch.empty(n_tok, spec.k, dtype=torch.float32, device=dev)
    backend.sample(logits, keys, key_mix, label_col, owns_label, norms.ok, norms.total, norms.rank_cum,
                   norms.rank_scale, prefix, spec, partial, cols, weights, lanes_out)
    return partial, cols, weights


@dataclass
class Rows:
    """What the forward of a range of rows produced: the loss, what the backward reads, and the
    statistics outputs. `forward_rows` builds one; the linear loss concatenates several."""

    loss: torch.Tensor  # float32 [R]
    coef_pi: torch.Tensor
    coef_q: torch.Tensor | None
    cols: torch.Tensor  # int32 [R, S]
    weights: torch.Tensor  # float32 [R, S]
    valid: torch.Tensor  # bool [R]
    local: torch.Tensor | None  # [R, C] float64, kept only when the backend's grad reads it
    stats: tuple | None = None  # want_stats: (label_logprob, label_prob_tempered, hits, reward_mean, lanes)

    def saved(self) -> "Rows":
        """The part the backward reads (the statistics outputs are returned, not saved)."""
        return Rows(None, self.coef_pi, self.coef_q, self.cols, self.weights, self.valid, self.local)

    def outputs(self, ctx, device, want_stats: bool):
        """An autograd function's return value: the loss, with ``want_stats`` also the statistics
        (empty where the estimator has none), marked non-differentiable."""
        if not want_stats:
            return self.loss
        outs = tuple(torch.empty(0, device=device) if t is None else t for t in self.stats)
        ctx.mark_non_differentiable(*outs)
        return (self.loss,) + outs

    def take(self, lo: int, hi: int) -> "Rows":
        def part(t):
            return None if t is None else t[lo:hi]

        return Rows(None, self.coef_pi[lo:hi], part(self.coef_q), self.cols[lo:hi], self.weights[lo:hi],
                    self.valid[lo:hi], part(self.local))

    @staticmethod
    def cat(parts: list["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]

        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)

        fields_ = [cat([getattr(p, f) for p in parts]) for f in
                   ("loss", "coef_pi", "coef_q", "cols", "weights", "valid", "local")]
        stats = None if parts[0].stats is None else tuple(cat([p.stats[i] for p in parts]) for i in range(5))
        return Rows(*fields_, stats=stats)


def forward_rows(backend: Backend, spec: Spec, logits, pro: Prologue, keys, group, chunk: int, want_stats: bool,
                 scratch=None) -> Rows:
    """Steps 1-5 (statistics, all-gather, normalisers, sampling and all-reduce, finish) for rows of
    this rank's logits, whose prologue and keys are ``pro`` and ``keys``. Every rank calls it for the
    same rows (the collectives pair up)."""
    valid, owns, col = pro.valid, pro.owns_label, pro.label_col
    stats, prefix = local_statistics(backend, spec, logits, col, owns, chunk, valid, scratch)
    allstats = _all_gather(stats, group, spec.world)  # [tp, N, C]
    norms = partial = cols = weights = lanes = None
    if spec.estimator == "sample":
        norms = backend.combine.normalise(allstats, spec, valid)
        if want_stats:
            lanes = torch.empty(logits.size(0), spec.k, dtype=torch.int32, device=logits.device)
        partial, cols, weights = draw_samples(backend, spec, logits, keys, col, owns, norms, prefix, pro.key_mix,
                                              lanes)
        if group is not None:
            dist.all_reduce(partial, group=group)
    fin = backend.combine.finish(allstats, spec, valid, pro, norms, partial, want_stats)
    if cols is None:  # closed forms: the label entry
        cols, weights = fin.cols, fin.weights
    out = Rows(fin.loss, fin.coef_pi, fin.coef_q, cols, weights, valid,
               stats if backend.grad_reads_local else None)
    if want_stats:
        out.stats = (fin.label_logprob, fin.label_prob_tempered, fin.hits, fin.reward_mean, lanes)
    return out


def grad_rows(backend: Backend, spec: Spec, logits, out, grad_loss, rows: Rows, chunk: int, scratch=None) -> None:
    """The backward's gradient step for rows of logits, chunk by chunk, into ``out``."""
    n_tok = logits.size(0)
    g = grad_loss if grad_loss.dim() == 1 else grad_loss.reshape(-1)
    if g.dtype != torch.float32:
        g = g.float()
    if scratch is None:
        scratch = backend.scratch(min(chunk, n_tok), spec.n_real, logits.device)
    parts = _chunks(n_tok, chunk)
    if parts is None:  # one chunk of every row: no slicing (fewer host ops)
        extra = {"local": rows.local} if rows.local is not None else {}
        backend.grad(logits, out, g, rows.coef_pi, rows.coef_q, rows.cols, rows.weights, rows.valid, spec, scratch,
                     **extra)
    for lo, hi in parts or ():
        part = rows.take(lo, hi)
        extra = {"local": part.local} if part.local is not None else {}
        backend.grad(logits[lo:hi], out[lo:hi], g[lo:hi], part.coef_pi, part.coef_q, part.cols, part.weights,
                     part.valid, spec, scratch, **extra)


# --------------------------------------------------------------------------------------------
# the autograd function: orchestration only
# --------------------------------------------------------------------------------------------


class _VocabParallelOTR(torch.autograd.Function):
    """Forward: the named steps above. Backward: the backend's gradient step, chunk by chunk.

    Outputs: the loss; with ``want_stats`` also (label_logprob, label_prob_tempered, hits, reward_mean,
    owned lanes), marked non-differentiable (empty where the estimator has none).
    """

    @staticmethod
    def forward(ctx, logits, pro: Prologue, keys, spec: Spec, backend: Backend, group, chunk, inplace, want_stats):
        rows = forward_rows(backend, spec, logits, pro, keys, group, chunk, want_stats)
        ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: none is built
        ctx.save_for_backward(logits)
        ctx.rows, ctx.spec, ctx.backend, ctx.chunk, ctx.inplace = rows.saved(), spec, backend, chunk, inplace
        return rows.outputs(ctx, logits.device, want_stats)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        nones = (None,) * 8
        if grad_loss is None:
            return (None,) + nones
        (logits,) = ctx.saved_tensors
        out = logits if ctx.inplace else torch.empty_like(logits)
        grad_rows(ctx.backend, ctx.spec, logits, out, grad_loss, ctx.rows, ctx.chunk)
        return (out,) + nones


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def vocab_parallel_otr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: OTRConfig,
    tp_group=None,
    step: int | torch.Tensor = 0,
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
        (seed, step, key, sample index). ``step``: an int in [0, 2**63), or a 0-dim int64 tensor on the
        logits' device (the same draws; what a CUDA-graph-captured call passes, the graph then reads
        the step from that tensor at every replay). Default keys are the flat token index within this
        call; pass global keys (sample id x max length + position) for layout- and resume-invariant draws.
    vocab_size: real vocabulary size; padded ids are never sampled and excluded from the softmax.
    padded_vocab_size: if given, checked against ``logits.size(-1) * tp`` (catches gathered logits).

    Input checks (labels in range, every TP rank with the same inputs) follow ``cfg.check_inputs``:
    by default they raise at the next call or at `otr_megatron.check_pending()` (`core/checks.py`).

    Returns the float32 per-token loss shaped like ``labels`` (normalisation is the caller's), and
    with ``return_stats=True`` also a dict of per-token tensors: ``label_logprob``, ``valid`` and, for
    the tempered estimators, ``label_prob_tempered``; for ``estimator="sample"`` ``hits`` (how many of
    the K samples equal the label), ``reward_mean`` (sum_j R_j / K) and ``owned_samples``, a pair
    (flat token index, global id) of 1-D tensors listing the samples this rank drew (one host sync).
    """
    _check_logits(logits)
    call = prepare_call(cfg, labels, token_keys, tp_group, step, vocab_size, ignore_index, padded_vocab_size,
                        shard=logits.size(-1), device=logits.device, lead_shape=tuple(logits.shape[:-1]),
                        tokens_in="logits")
    shard = logits.size(-1)
    flat_logits = logits if logits.dim() == 2 else logits.reshape(-1, shard)
    if not flat_logits.is_contiguous():
        flat_logits = flat_logits.contiguous()
    if cfg.chunk_tokens:
        chunk = cfg.chunk_tokens
    elif call.backend.one_pass:
        chunk = max(1, flat_logits.size(0))
    else:
        chunk = _default_chunk_tokens(shard, flat_logits.device.type == "cuda")
    out = _VocabParallelOTR.apply(flat_logits, call.pro, call.keys, call.spec, call.backend, tp_group, chunk,
                                  cfg.inplace_backward, return_stats)
    return call.results(out, return_stats)


@dataclass
class Call:
    """One call's checked, flattened inputs (shared by the logits and the linear entry points)."""

    shape: torch.Size  # the labels' shape: the loss's
    keys: torch.Tensor  # [N] int64
    spec: Spec
    backend: Backend
    pro: Prologue

    def results(self, out, return_stats: bool):
        """The entry points' return value from the autograd function's outputs."""
        shape, spec, valid = self.shape, self.spec, self.pro.valid
        if not return_stats:
            return out if len(shape) == 1 else out.view(shape)
        loss, label_logprob, q_label, hits, reward_mean, lanes = out
        loss = loss if len(shape) == 1 else loss.view(shape)

        def per_token(value):
            return torch.where(valid, value, 0.0).view(shape)

        stats = {"label_logprob": per_token(label_logprob), "valid": valid.view(shape)}
        if spec.tempered:
            stats["label_prob_tempered"] = per_token(q_label)
        if spec.estimator == "sample":
            stats["hits"] = torch.where(valid, hits, 0.0).round().to(torch.int64).view(shape)
            stats["reward_mean"] = per_token(reward_mean)
            # this rank's draws, one entry per sample (duplicates repeated): (flat token index, global id)
            tok, j = (lanes >= 0).nonzero(as_tuple=True)  # the one host sync (return_stats only)
            stats["owned_samples"] = (tok, lanes[tok, j].to(torch.int64) + spec.rank * spec.shard)
        return loss, stats


def prepare_call(cfg, labels, token_keys, tp_group, step, vocab_size, ignore_index, padded_vocab_size, *,
                 shard: int, device, lead_shape: tuple, tokens_in: str) -> Call:
    """Checks the arguments every entry point shares, flattens labels and keys, runs the prologue and
    submits the input fingerprint. ``lead_shape``: the token shape the labels must have (named after
    ``tokens_in`` in the error)."""
    world, rank = _tp_layout(tp_group)
    vocab_size = _check_args(shard, lead_shape, device, tokens_in, labels, cfg, token_keys, vocab_size,
                             padded_vocab_size, step, world)
    mode = cfg.check_inputs
    if mode != "off":
        checks.check_ready()  # earlier calls' deferred checks whose copies have arrived
    flat_labels = labels if labels.dim() == 1 else labels.reshape(-1)
    if flat_labels.dtype != torch.int64:
        flat_labels = flat_labels.to(torch.int64)
    if token_keys is None:
        keys = torch.arange(flat_labels.numel(), device=labels.device)
    else:
        keys = token_keys if token_keys.dim() == 1 else token_keys.reshape(-1)
        if keys.dtype != torch.int64:
            keys = keys.to(torch.int64)
    spec = make_spec(cfg, rank, world, shard, vocab_size)
    backend = get_backend(cfg.backend, device)
    pro = backend.combine.prologue(flat_labels, keys, step, spec, ignore_index, vocab_size,
                                   _settings_id(cfg, ignore_index), mode != "off")
    if mode != "off":
        # only the fields that must agree cross ranks (FP_COMPARED numbers per rank)
        gathered = _all_gather(pro.prints[:FP_COMPARED], tp_group, world)
        checks.submit(gathered, pro.prints, mode, vocab_size, ignore_index, labels=flat_labels)
    return Call(labels.shape, keys, spec, backend, pro)


def check_pending() -> None:
    """Raise the first deferred input-check failure of earlier calls (naming their step); see
    `core/checks.py`. Call once per training step (the integrations do)."""
    checks.check_pending()
